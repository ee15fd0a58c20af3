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


def nms(dets: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS exactly as the reference ``py_cpu_nms``: indices of kept rows of ``dets (N, >=5)``.

    ``dets`` columns are x1, y1, x2, y2, score. Areas use +1; a box is suppressed when its IoU with a kept
    box is above ``threshold``. Ties in score keep numpy's ``argsort()[::-1]`` order, as the reference.
    """
    dets = np.asarray(dets)
    if dets.ndim != 2 or dets.shape[1] < 5:
        raise ValueError(f"nms expects (N, >=5) detections, got shape {dets.shape}")
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


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
