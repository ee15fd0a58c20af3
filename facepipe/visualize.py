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


# Marks scale with each face so that crowds stay readable: a fixed-size label covers a small face entirely.
MIN_LABELLED_SIDE = 40  # px; a smaller face gets no label: its text (under 8 px) would be unreadable
LABEL_HEIGHT = 1 / 5  # text height, of the face's shorter side
LINE_WIDTH = 1 / 60  # of the face's shorter side, at least 1 px
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_HEIGHT = cv2.getTextSize("0.99", _FONT, 1.0, 1)[0][1]  # text height at font scale 1


def draw_faces(image: np.ndarray, faces: Sequence[Face], show_scores: bool = True) -> np.ndarray:
    """A copy of the BGR ``image`` with each face's box, score and landmarks drawn, sized to the face."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) BGR image, got {image.dtype} {image.shape}")
    canvas = image.copy()
    # Small faces first, so that a large face's label is not painted over by its small neighbours' boxes.
    for face in sorted(faces, key=_face_side):
        side = _face_side(face)
        width = max(1, round(side * LINE_WIDTH))
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_COLOR, width, cv2.LINE_8)
        if show_scores and side >= MIN_LABELLED_SIDE:
            _draw_label(canvas, f"{face.score:.2f}", x1, y1, side * LABEL_HEIGHT / _FONT_HEIGHT)
        for (x, y), name in zip(face.landmarks, LANDMARK_NAMES):
            centre = (int(round(float(x))), int(round(float(y))))
            cv2.circle(canvas, centre, width + 1, LANDMARK_COLORS[name], cv2.FILLED, cv2.LINE_8)
    return canvas


def _face_side(face: Face) -> float:
    x1, y1, x2, y2 = (float(v) for v in face.box)
    return max(0.0, min(x2 - x1, y2 - y1))


def _draw_label(canvas: np.ndarray, text: str, x: int, y: int, font_scale: float) -> None:
    """Black ``text`` on a box-coloured plate above ``(x, y)``, or just inside the box at the image's top edge."""
    thickness = max(1, round(font_scale * 1.5))
    (tw, th), baseline = cv2.getTextSize(text, _FONT, font_scale, thickness)
    plate = th + baseline + 2
    top = y - plate if y - plate >= 0 else y
    cv2.rectangle(canvas, (x, top), (x + tw + 2, top + plate), BOX_COLOR, cv2.FILLED)
    cv2.putText(canvas, text, (x + 1, top + th + 1), _FONT, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)


def save_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode by the file extension and write atomically (a crash leaves no half-written picture)."""
    path = Path(path)
    ok, encoded = cv2.imencode((path.suffix or ".jpg").lower(), image)
    if not ok:
        raise ValueError(f"cannot encode an image as {path.suffix!r}")
    atomic_write_bytes(path, encoded.tobytes())
