"""RetinaFace prior (anchor) boxes, as the reference ``PriorBox`` lays them out, cached per input size."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from facepipe.models.retinaface import MIN_SIZES, STEPS


def feature_map_sizes(height: int, width: int, steps: tuple[int, ...] = STEPS) -> list[tuple[int, int]]:
    return [(math.ceil(height / step), math.ceil(width / step)) for step in steps]


@lru_cache(maxsize=32)
def prior_boxes(
    height: int,
    width: int,
    min_sizes: tuple[tuple[int, ...], ...] = MIN_SIZES,
    steps: tuple[int, ...] = STEPS,
) -> np.ndarray:
    """``(P, 4)`` float32 ``cx, cy, w, h`` normalised by ``(width, height)``; read-only (shared by the cache).

    Order: level (stride), feature-map row, column, then min size -- the order the heads emit their
    anchors in. 640x640 gives 16,800 priors. Computed in float64 and rounded once, like the reference
    (Python floats turned into a float32 tensor).
    """
    if height < 1 or width < 1:
        raise ValueError(f"prior_boxes needs a positive size, got {height}x{width}")
    if len(min_sizes) != len(steps):
        raise ValueError("min_sizes and steps must have one entry per pyramid level")
    levels = []
    for (rows, cols), step, sizes in zip(feature_map_sizes(height, width, steps), steps, min_sizes):
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width, indexing="ij")
        per_size = [
            np.stack(
                [cx, cy, np.full_like(cx, size / width), np.full_like(cx, size / height)], axis=-1
            )
            for size in sizes
        ]
        levels.append(np.stack(per_size, axis=2).reshape(-1, 4))  # (rows, cols, sizes, 4) -> row-major
    priors = np.concatenate(levels).astype(np.float32)
    priors.setflags(write=False)
    return priors


@lru_cache(maxsize=32)
def unpadded_priors(height: int, width: int, padded_height: int, padded_width: int) -> np.ndarray:
    """Boolean mask over ``prior_boxes(padded_height, padded_width)``: the priors a ``height`` x ``width`` input has
    (same cells, same pixel centres), i.e. those of the image when its input was padded at the bottom and right."""
    if padded_height < height or padded_width < width:
        raise ValueError(f"padded size {padded_height}x{padded_width} is smaller than {height}x{width}")
    levels = []
    for (rows, cols), (padded_rows, padded_cols), sizes in zip(
        feature_map_sizes(height, width), feature_map_sizes(padded_height, padded_width), MIN_SIZES
    ):
        inside = (np.arange(padded_rows)[:, None] < rows) & (np.arange(padded_cols)[None, :] < cols)
        levels.append(np.repeat(inside.reshape(-1), len(sizes)))
    mask = np.concatenate(levels)
    mask.setflags(write=False)
    return mask


def num_priors(height: int, width: int) -> int:
    return sum(rows * cols * len(sizes) for (rows, cols), sizes in zip(feature_map_sizes(height, width), MIN_SIZES))
