"""Least-squares similarity alignment (Umeyama 1991), batched, as insightface's ``norm_crop`` computes it.

Not RANSAC: ``cv2.estimateAffinePartial2D`` drops a landmark it considers an outlier and moves crops by
tens of pixels against the reference, so the closed-form estimate over all five points is used.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from facepipe.types import Face

# The ArcFace 112x112 destination points, image order (image-left eye, image-right eye, nose, mouth corners).
# insightface stores them as float32; rounding through float32 keeps our transforms on the reference's values.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
).astype(np.float64)


def arcface_template(size: int | tuple[int, int] = 112) -> np.ndarray:
    """Template for an output of ``size`` (int = square, or ``(H, W)``) with insightface's offsets.

    Square sizes that are multiples of 112 scale the template; multiples of 128 scale it by size/128 and shift
    it right by 8*ratio (insightface ``estimate_norm``). ``(112, 96)`` is the SphereFace-width crop: the
    112 template moved 8 px left.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if (height, width) == (112, 96):
        return ARCFACE_TEMPLATE_112 - np.array([8.0, 0.0])
    if height != width:
        raise ValueError(f"unsupported crop size {height}x{width}: use a square size or (112, 96)")
    if height % 112 == 0:
        ratio, diff_x = height / 112.0, 0.0
    elif height % 128 == 0:
        ratio = height / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"crop size {height} is not a multiple of 112 or 128")
    template = ARCFACE_TEMPLATE_112 * ratio
    template[:, 0] += diff_x
    return template


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transforms mapping ``src`` onto ``dst``.

    ``src``: ``(N, K, 2)`` or ``(K, 2)``; ``dst``: ``(K, 2)`` or ``(N, K, 2)``. Returns ``(N, 2, 3)`` (or
    ``(2, 3)`` for unbatched input) float64 matrices. Degenerate inputs (all points equal) give NaN matrices,
    as scikit-image does, so callers can tell them apart.
    """
    unbatched = np.ndim(src) == 2
    src = np.atleast_3d(np.asarray(src, dtype=np.float64).reshape(-1, *np.shape(src)[-2:]))
    dst = np.broadcast_to(np.asarray(dst, dtype=np.float64), src.shape)
    n_points = src.shape[1]
    src_mean = src.mean(axis=1, keepdims=True)
    dst_mean = dst.mean(axis=1, keepdims=True)
    src_c = src - src_mean
    dst_c = dst - dst_mean
    cov = np.einsum("nki,nkj->nij", dst_c, src_c) / n_points
    u, s, vt = np.linalg.svd(cov)
    d = np.ones((src.shape[0], 2))
    d[np.linalg.det(cov) < 0, 1] = -1.0
    rotation = np.einsum("nij,nj,njk->nik", u, d, vt)
    src_var = (src_c**2).sum(axis=(1, 2)) / n_points
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (s * d).sum(axis=1) / src_var
    linear = rotation * scale[:, None, None]
    translation = dst_mean[:, 0, :] - np.einsum("nij,nj->ni", linear, src_mean[:, 0, :])
    matrices = np.concatenate([linear, translation[:, :, None]], axis=2)
    matrices[~np.isfinite(matrices).all(axis=(1, 2))] = np.nan
    return matrices[0] if unbatched else matrices


def estimate_norm(landmarks: np.ndarray, size: int | tuple[int, int] = 112) -> np.ndarray:
    """2x3 (or Nx2x3) matrix taking image coordinates to the aligned crop, for ``(5, 2)``/``(N, 5, 2)`` input."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks must be (5, 2) or (N, 5, 2), got {landmarks.shape}")
    return umeyama_similarity(landmarks, arcface_template(size))


def _output_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else size


def warp_crops(image: np.ndarray, matrices: np.ndarray, size: int | tuple[int, int] = 112) -> np.ndarray:
    """Warp ``image`` by each ``(2, 3)`` matrix into ``(N, H, W, C)`` crops: bilinear, black border."""
    height, width = _output_hw(size)
    matrices = np.asarray(matrices, dtype=np.float64).reshape(-1, 2, 3)
    crops = np.zeros((len(matrices), height, width, image.shape[2]), dtype=image.dtype)
    for i, matrix in enumerate(matrices):
        if np.isfinite(matrix).all():
            crops[i] = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return crops


def norm_crop(image: np.ndarray, landmarks: np.ndarray, size: int | tuple[int, int] = 112) -> np.ndarray:
    """One aligned crop, the equivalent of insightface ``face_align.norm_crop``."""
    return warp_crops(image, estimate_norm(landmarks, size)[None], size)[0]


def align_faces(
    images: Sequence[np.ndarray], faces_per_image: Sequence[Sequence[Face]], size: int | tuple[int, int] = 112
) -> list[np.ndarray]:
    """Batched alignment: for each image, an ``(N_i, H, W, 3)`` array with one crop per face, in order."""
    if len(images) != len(faces_per_image):
        raise ValueError(f"{len(images)} images but {len(faces_per_image)} face lists")
    counts = [len(faces) for faces in faces_per_image]
    all_landmarks = [face.landmarks for faces in faces_per_image for face in faces]
    height, width = _output_hw(size)
    if not all_landmarks:
        return [np.zeros((0, height, width, 3), dtype=np.uint8) for _ in images]
    matrices = estimate_norm(np.stack(all_landmarks), size)
    out, start = [], 0
    for image, count in zip(images, counts):
        out.append(warp_crops(image, matrices[start : start + count], size))
        start += count
    return out
