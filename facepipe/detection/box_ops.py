"""Box decoding, NMS and IoU for RetinaFace-style detectors (vectorised; numpy, decode also torch).

Conventions follow the reference implementation: offsets are decoded against ``cx, cy, w, h`` priors with
variances (0.1, 0.2); NMS and box voting use the "+1" pixel convention (``area = (x2-x1+1)*(y2-y1+1)``)
of ``py_cpu_nms``, while :func:`box_iou` (used for matching and evaluation helpers) has no +1 unless asked.
The encode side (used for training targets) lives with the training code.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from facepipe.models.retinaface import VARIANCES

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _backend(x: np.ndarray | torch.Tensor):
    if isinstance(x, torch.Tensor):
        return torch.exp, lambda parts: torch.cat(parts, dim=-1)
    return np.exp, lambda parts: np.concatenate(parts, axis=-1)


def decode(loc: Array, priors: Array, variances: tuple[float, float] = VARIANCES) -> Array:
    """Offsets ``(..., P, 4)`` + priors ``(P, 4)`` cx,cy,w,h -> boxes ``(..., P, 4)`` x1,y1,x2,y2 (normalised)."""
    exp, cat = _backend(loc)
    centers = priors[..., :2] + loc[..., :2] * variances[0] * priors[..., 2:]
    sizes = priors[..., 2:] * exp(loc[..., 2:] * variances[1])
    top_left = centers - sizes / 2
    return cat([top_left, sizes + top_left])


def decode_landmarks(pre: Array, priors: Array, variances: tuple[float, float] = VARIANCES) -> Array:
    """Offsets ``(..., P, 10)`` + priors -> 5 points ``(..., P, 10)`` x0,y0..x4,y4 (normalised)."""
    _, cat = _backend(pre)
    return cat([priors[..., :2] + pre[..., 2 * k: 2 * k + 2] * variances[0] * priors[..., 2:] for k in range(5)])


def box_area(boxes: np.ndarray, plus_one: bool = False) -> np.ndarray:
    extra = 1.0 if plus_one else 0.0
    return (boxes[..., 2] - boxes[..., 0] + extra) * (boxes[..., 3] - boxes[..., 1] + extra)


def box_iou(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """Pairwise IoU ``(len(a), len(b))`` of xyxy boxes; empty or degenerate pairs give 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    extra = 1.0 if plus_one else 0.0
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left + extra, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a, plus_one)[:, None] + box_area(b, plus_one)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# Boxes resolved together: a (B, B) overlap block plus one (kept, B) block stays in cache and bounds memory
# for the 5,000 reference candidates; measured fastest among 128-1024 on the VGA WIDER candidates.
NMS_BLOCK = 256


def _overlaps(x1, y1, x2, y2, areas, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``(len(a), len(b))`` (+1 areas) of the boxes at positions ``a`` against those at ``b``.

    The operations are those of ``py_cpu_nms`` in its order and dtype, and each is symmetric in the two
    boxes, so every entry is bit-identical to the value the reference loop computes for that pair.
    """
    w = np.maximum(0.0, np.minimum(x2[a, None], x2[None, b]) - np.maximum(x1[a, None], x1[None, b]) + 1)
    h = np.maximum(0.0, np.minimum(y2[a, None], y2[None, b]) - np.maximum(y1[a, None], y1[None, b]) + 1)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):  # the reference suppresses these too (NaN <= t is False)
        return inter / (areas[a, None] + areas[None, b] - inter)


# Whole-block rounds before the rest of a block is finished box by box (see _greedy_in_block). Real
# candidates settle in 2-4 rounds; the cap bounds the cost of contrived chains of overlaps.
NMS_ROUNDS = 6


def _greedy_in_block(suppresses: np.ndarray) -> np.ndarray:
    """Greedy NMS inside one score-ordered block of boxes: a mask of the kept ones.

    ``suppresses[i, j]`` (i before j) means box i removes box j if i is kept. Instead of a Python step per
    kept box, rounds of whole-block steps: a box suppressed by a kept box is removed; a box that no earlier
    kept-or-undecided box suppresses is kept. Each decision is the greedy one and the first undecided box
    is always decided in the next round, but a chain "i suppresses j suppresses k ..." takes a round per
    link, so after ``NMS_ROUNDS`` the boxes still undecided are settled one at a time in order.
    """
    suppresses = np.triu(suppresses, k=1)
    kept = np.zeros(len(suppresses), dtype=bool)
    undecided = np.ones(len(suppresses), dtype=bool)
    for _ in range(NMS_ROUNDS):
        if not undecided.any():
            return kept
        undecided &= ~suppresses[kept].any(axis=0)
        newly_kept = undecided & ~suppresses[kept | undecided].any(axis=0)
        kept |= newly_kept
        undecided &= ~newly_kept
    for i in np.flatnonzero(undecided):  # every box before i is decided by now
        kept[i] = not suppresses[kept, i].any()
    return kept


def nms(dets: np.ndarray, threshold: float, limit: int | None = None, min_score: float | None = None) -> np.ndarray:
    """Greedy NMS exactly as the reference ``py_cpu_nms``: indices of kept rows of ``dets (N, >=5)``.

    ``dets`` columns are x1, y1, x2, y2, score. Areas use +1; a box is suppressed when its IoU with a kept
    box is above ``threshold``. Ties in score keep numpy's ``argsort()[::-1]`` order, as the reference.
    ``limit`` returns only the first ``limit`` kept indices (``nms(dets, t)[:limit]``) and stops there.
    ``min_score`` returns only kept boxes scoring at least that, i.e. ``keep[dets[keep, 4] >= min_score]``,
    without looking at the boxes below it: a box can only be suppressed by boxes that score higher.

    Same kept rows in the same order as the reference loop, without its Python iteration per kept box:
    candidates are taken in score order ``NMS_BLOCK`` at a time; a block is first filtered by the boxes
    kept so far (one vectorised IoU block) and then resolved within itself (:func:`_greedy_in_block`).
    """
    dets = np.asarray(dets)
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise ValueError(f"nms expects (N, >=5) detections, got shape {dets.shape}")
    limit = len(dets) if limit is None else max(int(limit), 0)
    order = dets[:, 4].argsort()[::-1]
    if min_score is not None:
        # A suffix of the order (NaN scores sort first and are kept, as the reference does).
        order = order[~(dets[order, 4] < min_score)]
    x1, y1, x2, y2 = (np.ascontiguousarray(dets[order, k]) for k in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)  # in score order (positions), values as the reference's
    kept = np.zeros(0, dtype=np.int64)  # positions in score order, increasing
    for start in range(0, len(order), NMS_BLOCK):
        if len(kept) >= limit:
            break
        block = np.arange(start, min(start + NMS_BLOCK, len(order)))
        if len(kept):
            block = block[(_overlaps(x1, y1, x2, y2, areas, kept, block) <= threshold).all(axis=0)]
        suppresses = ~(_overlaps(x1, y1, x2, y2, areas, block, block) <= threshold)
        kept = np.concatenate([kept, block[_greedy_in_block(suppresses)]])
    return order[kept[:limit]].astype(np.int64)


def box_voting(dets: np.ndarray, threshold: float = 0.4) -> np.ndarray:
    """Merge overlapping detections (multi-scale / flip test): score-weighted mean of each cluster.

    ``dets (N, 5 + K)``: x1, y1, x2, y2, score, then K extra coordinates (e.g. 10 landmark values) that are
    averaged with the same weights. Clusters are formed greedily around the highest remaining score with
    IoU (+1 convention) >= ``threshold``; the merged row keeps the cluster's maximum score. Returns rows
    sorted by score, descending.
    """
    dets = np.asarray(dets, dtype=np.float32)
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise ValueError(f"box_voting expects (N, >=5) detections, got shape {dets.shape}")
    dets = dets[np.argsort(-dets[:, 4], kind="stable")]
    areas = box_area(dets, plus_one=True)
    remaining = np.arange(len(dets))
    merged = []
    while remaining.size > 0:
        top = remaining[0]
        w = np.maximum(0.0, np.minimum(dets[top, 2], dets[remaining, 2]) - np.maximum(dets[top, 0], dets[remaining, 0]) + 1)
        h = np.maximum(0.0, np.minimum(dets[top, 3], dets[remaining, 3]) - np.maximum(dets[top, 1], dets[remaining, 1]) + 1)
        inter = w * h
        overlap = inter / (areas[top] + areas[remaining] - inter)
        in_cluster = overlap >= threshold
        cluster = dets[remaining[in_cluster]]
        weights = cluster[:, 4:5].astype(np.float64)
        row = (cluster.astype(np.float64) * weights).sum(axis=0) / weights.sum()
        row[4] = cluster[:, 4].max()
        merged.append(row)
        remaining = remaining[~in_cluster]
    if not merged:
        return np.zeros((0, dets.shape[1]), dtype=np.float32)
    return np.stack(merged).astype(np.float32)
