"""The one record type that flows through the whole pipeline.

Conventions used everywhere in facepipe:

* Images are ``numpy.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, **BGR** channel order (what OpenCV
  decodes). Each model converts to its own input contract (see ``facepipe.models``).
* Boxes are ``xyxy`` in pixels of the image the face was found in.
* Landmarks are ``(5, 2)`` ``(x, y)`` in *image* order: image-left eye, image-right eye, nose,
  image-left mouth corner, image-right mouth corner (the order RetinaFace, SCRFD and MTCNN emit, and the
  order of the ArcFace template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True, eq=False)
class Face:
    box: np.ndarray  # (4,) float32 x1, y1, x2, y2
    score: float
    landmarks: np.ndarray  # (5, 2) float32, image order (see module docstring)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        box = np.asarray(self.box, dtype=np.float32).reshape(-1)
        landmarks = np.asarray(self.landmarks, dtype=np.float32)
        if box.shape != (4,):
            raise ValueError(f"Face.box must have 4 values (x1, y1, x2, y2), got shape {box.shape}")
        if landmarks.size != 10:
            raise ValueError(f"Face.landmarks must have 5 (x, y) points, got shape {landmarks.shape}")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", landmarks.reshape(5, 2))
        object.__setattr__(self, "score", float(self.score))

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return float(self.box[0] + self.box[2]) / 2, float(self.box[1] + self.box[3]) / 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``facepipe detect`` output lines and manifests."""
        return {
            "box": [round(float(v), 3) for v in self.box],
            "score": round(self.score, 6),
            "landmarks": [[round(float(x), 3), round(float(y), 3)] for x, y in self.landmarks],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Face":
        return cls(box=data["box"], score=data["score"], landmarks=data["landmarks"])

    @classmethod
    def from_row(cls, row: Sequence[float]) -> "Face":
        """From a reference detection row ``[x1, y1, x2, y2, score, lx0, ly0, ..., lx4, ly4]``."""
        row = np.asarray(row, dtype=np.float32)
        return cls(box=row[:4], score=float(row[4]), landmarks=row[5:15].reshape(5, 2))

    def to_row(self) -> np.ndarray:
        return np.concatenate([self.box, [self.score], self.landmarks.reshape(-1)]).astype(np.float32)

    def scaled(self, sx: float, sy: float | None = None) -> "Face":
        sy = sx if sy is None else sy
        scale = np.array([sx, sy], dtype=np.float32)
        return Face(self.box * np.tile(scale, 2), self.score, self.landmarks * scale, dict(self.extra))

    def translated(self, dx: float, dy: float) -> "Face":
        offset = np.array([dx, dy], dtype=np.float32)
        return Face(self.box + np.tile(offset, 2), self.score, self.landmarks + offset, dict(self.extra))


def faces_from_rows(rows: np.ndarray) -> list[Face]:
    return [Face.from_row(r) for r in np.asarray(rows, dtype=np.float32).reshape(-1, 15)]


def faces_to_rows(faces: Sequence[Face]) -> np.ndarray:
    if not faces:
        return np.zeros((0, 15), dtype=np.float32)
    return np.stack([f.to_row() for f in faces])
