"""Draw detections on images: boxes, scores and the five landmarks, each landmark in its own colour."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from facepipe.io.atomic import atomic_write_bytes
from facepipe.types import LANDMARK_NAMES, Face

# BGR. Distinct hues so that a swapped eye or mouth corner is visible at a glance.
BOX_COLOR = (0, 220, 0)
LANDMARK_COLORS: dict[str, tuple[int, int, int]] = {
    "left_eye": (255, 0, 0),  # blue
    "right_eye": (0, 0, 255),  # red
    "nose": (0, 255, 255),  # yellow
    "mouth_left": (255, 0, 255),  # magenta
    "mouth_right": (0, 140, 255),  # orange
}
assert tuple(LANDMARK_COLORS) == LANDMARK_NAMES


def _line_width(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 500))


def draw_faces(image: np.ndarray, faces: Sequence[Face], show_scores: bool = True) -> np.ndarray:
    """A copy of the BGR ``image`` with each face's box, score and landmarks drawn."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) BGR image, got {image.dtype} {image.shape}")
    canvas = image.copy()
    width = _line_width(image)
    radius = width + 1
    font_scale = max(0.4, width * 0.4)
    for face in faces:
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_COLOR, width, cv2.LINE_8)
        if show_scores:
            text = f"{face.score:.2f}"
            (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
            top = y1 - th - baseline - 2 if y1 - th - baseline - 2 >= 0 else y1  # inside the box at the top edge
            cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + baseline + 2), BOX_COLOR, cv2.FILLED)
            cv2.putText(
                canvas, text, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA
            )
        for (x, y), name in zip(face.landmarks, LANDMARK_NAMES):
            centre = (int(round(float(x))), int(round(float(y))))
            cv2.circle(canvas, centre, radius, LANDMARK_COLORS[name], cv2.FILLED, cv2.LINE_8)
    return canvas


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode by the file extension and write atomically (a crash leaves no half-written picture)."""
    path = Path(path)
    ok, encoded = cv2.imencode((path.suffix or ".jpg").lower(), image)
    if not ok:
        raise ValueError(f"cannot encode an image as {path.suffix!r}")
    atomic_write_bytes(path, encoded.tobytes())
