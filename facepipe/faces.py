"""The one face step every job shares: detect on a black-bordered copy, map faces back, choose among them.

Faces that fill the frame defeat anchor-based detectors (they never saw a face that large relative to the
image; insightface #801), and MTCNN as facenet-pytorch implements it stretches the part of a box inside the
image instead of zero-padding it, misplacing the landmarks of faces whose box crosses the border. A black
border of ``pad_ratio × longer side`` on each side fixes both; the faces come back in the original image's
coordinates.

Pad rounding (one rule for every caller): ``0`` for ``pad_ratio == 0``, else ``max(1, round(pad_ratio × L))``.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from facepipe.detection.base import Detector
from facepipe.pipeline.face_choice import KEEP_MODES, choose_faces
from facepipe.types import Face

__all__ = ["KEEP_MODES", "choose_faces", "detect_padded", "pad_image", "pad_width"]


def pad_width(image_shape: tuple[int, ...], pad_ratio: float) -> int:
    """Border width in pixels for one image (see the module docstring for the rounding rule)."""
    if pad_ratio < 0:
        raise ValueError(f"pad ratio must be >= 0, got {pad_ratio}")
    if pad_ratio == 0:
        return 0
    return max(1, int(round(pad_ratio * max(image_shape[:2]))))


def pad_image(image: np.ndarray, pad_ratio: float) -> tuple[np.ndarray, int]:
    """The image inside a black border of ``pad_width`` pixels, and that width."""
    pad = pad_width(image.shape, pad_ratio)
    if pad == 0:
        return image, 0
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0)), pad


def detect_padded(detector: Detector, images: Sequence[np.ndarray], pad_ratio: float = 0.0) -> list[list[Face]]:
    """``detector.detect`` on bordered copies (one batch), faces translated back to each original image."""
    if not images:
        return []
    padded = [pad_image(image, pad_ratio) for image in images]
    detections = detector.detect([image for image, _ in padded])
    if len(detections) != len(images):
        raise RuntimeError(f"detector returned {len(detections)} results for {len(images)} images")
    return [
        faces if pad == 0 else [face.translated(-pad, -pad) for face in faces]
        for faces, (_, pad) in zip(detections, padded)
    ]
