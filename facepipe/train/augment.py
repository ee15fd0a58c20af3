"""RetinaFace training augmentation (Pytorch_Retinaface ``preproc``), seeded through a numpy ``Generator``.

Order: random square crop -> (pad to square with the mean when no crop kept a face) -> photometric distortion
-> horizontal mirror -> resize to the training size with a random interpolation. The result is the network
input contract of ``facepipe.models.retinaface``: BGR float32 minus (104, 117, 123), no std scaling, CHW.

Faces are carried as ``FaceTargets``: boxes ``(N, 4)`` xyxy pixels, landmarks ``(N, 5, 2)`` pixels and
``has_landmarks`` ``(N,)``; absent landmarks are carried along untouched and never used by the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

RETINAFACE_MEAN_BGR = (104.0, 117.0, 123.0)
CROP_SCALES = (0.3, 0.45, 0.6, 0.8, 1.0)
CROP_TRIES = 250
# Mirroring swaps the image-left / image-right eye (0 <-> 1) and mouth corner (3 <-> 4).
MIRROR_LANDMARK_ORDER = (1, 0, 2, 4, 3)
INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)


@dataclass
class FaceTargets:
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    landmarks: np.ndarray  # (N, 5, 2) float32 pixels
    has_landmarks: np.ndarray  # (N,) bool

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.landmarks = np.asarray(self.landmarks, dtype=np.float32).reshape(-1, 5, 2)
        self.has_landmarks = np.asarray(self.has_landmarks, dtype=bool).reshape(-1)
        if not (len(self.boxes) == len(self.landmarks) == len(self.has_landmarks)):
            raise ValueError("boxes, landmarks and has_landmarks must have the same number of faces")

    def __len__(self) -> int:
        return len(self.boxes)

    def subset(self, keep: np.ndarray) -> "FaceTargets":
        return FaceTargets(self.boxes[keep], self.landmarks[keep], self.has_landmarks[keep])

    def copy(self) -> "FaceTargets":
        return FaceTargets(self.boxes.copy(), self.landmarks.copy(), self.has_landmarks.copy())

    def to_rows(self, width: float, height: float) -> np.ndarray:
        """``(N, 15)`` float32 rows normalised by the image size: box 4, landmarks 10, label (+1 / -1)."""
        scale = np.array([width, height], dtype=np.float32)
        boxes = self.boxes / np.tile(scale, 2)
        landmarks = np.where(self.has_landmarks[:, None, None], self.landmarks / scale, 0.0).reshape(-1, 10)
        labels = np.where(self.has_landmarks, 1.0, -1.0)[:, None]
        return np.concatenate([boxes, landmarks, labels], axis=1).astype(np.float32)


def random_square_crop(
    image: np.ndarray, faces: FaceTargets, rng: np.random.Generator, scales=CROP_SCALES, tries: int = CROP_TRIES
) -> tuple[np.ndarray, FaceTargets, bool]:
    """Crop a random square of ``scale * short side`` that wholly contains at least one face.

    Faces whose centre lies strictly inside the square are kept (clipped to it); others are dropped. Returns
    ``(crop, faces, cropped)``; ``cropped`` is False when no try succeeded and the input came back unchanged.
    """
    height, width = image.shape[:2]
    if len(faces) == 0:
        return image, faces, False
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    for _ in range(tries):
        side = int(scales[rng.integers(len(scales))] * min(width, height))
        if side < 1:
            continue
        left = 0 if width == side else int(rng.integers(width - side))
        top = 0 if height == side else int(rng.integers(height - side))
        roi = np.array([left, top, left + side, top + side], dtype=np.float32)
        inside = (faces.boxes[:, :2] >= roi[:2]).all(axis=1) & (faces.boxes[:, 2:] <= roi[2:]).all(axis=1)
        if not inside.any():  # the reference requires one face wholly inside (IoF >= 1)
            continue
        keep = ((centres > roi[:2]) & (centres < roi[2:])).all(axis=1)
        kept = faces.subset(keep).copy()
        kept.boxes[:, :2] = np.maximum(kept.boxes[:, :2], roi[:2]) - roi[:2]
        kept.boxes[:, 2:] = np.minimum(kept.boxes[:, 2:], roi[2:]) - roi[:2]
        kept.landmarks = np.clip(kept.landmarks - roi[:2], 0, side)
        positive = np.minimum(kept.boxes[:, 2] - kept.boxes[:, 0], kept.boxes[:, 3] - kept.boxes[:, 1]) > 0
        kept = kept.subset(positive)
        if len(kept) == 0:
            continue
        return image[top:top + side, left:left + side], kept, True
    return image, faces, False


def pad_to_square(image: np.ndarray, fill=RETINAFACE_MEAN_BGR) -> np.ndarray:
    """Pad right/bottom with the mean colour (zero after mean subtraction); faces keep their coordinates."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = np.empty((side, side, 3), dtype=image.dtype)
    out[:] = np.asarray(fill, dtype=image.dtype)
    out[:height, :width] = image
    return out


def photometric_distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation and hue, each with probability 0.5 (reference ranges)."""
    out = image.astype(np.float32)
    contrast_first = bool(rng.integers(2))

    def contrast(img: np.ndarray) -> np.ndarray:
        return img * rng.uniform(0.5, 1.5) if rng.integers(2) else img

    if rng.integers(2):
        out = out + rng.uniform(-32, 32)
    if contrast_first:
        out = contrast(out)
    hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
    if rng.integers(2):
        hsv[:, :, 1] *= rng.uniform(0.5, 1.5)
    if rng.integers(2):
        hsv[:, :, 0] = np.mod(hsv[:, :, 0] + rng.integers(-18, 19), 180)  # OpenCV hue is 0..179
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    if not contrast_first:
        out = contrast(out)
    return np.clip(out, 0, 255).astype(np.uint8)


def mirror(image: np.ndarray, faces: FaceTargets) -> tuple[np.ndarray, FaceTargets]:
    """Horizontal flip; x -> width - x (continuous coordinates) and left/right landmarks swapped."""
    width = image.shape[1]
    flipped = faces.copy()
    flipped.boxes[:, 0] = width - faces.boxes[:, 2]
    flipped.boxes[:, 2] = width - faces.boxes[:, 0]
    flipped.landmarks[:, :, 0] = width - faces.landmarks[:, :, 0]
    flipped.landmarks = flipped.landmarks[:, MIRROR_LANDMARK_ORDER]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def to_network_input(image: np.ndarray, mean=RETINAFACE_MEAN_BGR) -> np.ndarray:
    """BGR uint8 HWC -> float32 CHW minus the mean: the RetinaFace input contract."""
    return (image.astype(np.float32) - np.asarray(mean, dtype=np.float32)).transpose(2, 0, 1).copy()


@dataclass(frozen=True)
class TrainAugment:
    """The training transform. ``__call__`` returns the ``(3, S, S)`` input and ``(N, 15)`` normalised rows."""

    image_size: int = 640
    crop_scales: tuple[float, ...] = CROP_SCALES
    crop_tries: int = CROP_TRIES
    distort: bool = True
    mirror_probability: float = 0.5

    def __call__(self, image: np.ndarray, faces: FaceTargets, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, faces, cropped = random_square_crop(image, faces, rng, self.crop_scales, self.crop_tries)
        if not cropped:
            image = pad_to_square(image)
        if self.distort:
            image = photometric_distort(image, rng)
        if rng.random() < self.mirror_probability:
            image, faces = mirror(image, faces)
        height, width = image.shape[:2]
        interpolation = INTERPOLATIONS[int(rng.integers(len(INTERPOLATIONS)))]
        image = cv2.resize(image, (self.image_size, self.image_size), interpolation=interpolation)
        return to_network_input(image), faces.to_rows(width, height)


@dataclass(frozen=True)
class EvalTransform:
    """No augmentation: pad to square with the mean, resize to the training size (for validation loss)."""

    image_size: int = 640

    def __call__(self, image: np.ndarray, faces: FaceTargets, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image = pad_to_square(image)
        side = image.shape[0]
        image = cv2.resize(image, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        return to_network_input(image), faces.to_rows(side, side)
