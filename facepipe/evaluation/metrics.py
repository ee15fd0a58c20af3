"""The metrics every verification protocol reports: ROC, TAR at fixed FARs, one ROC plot, one Markdown table.

* ``roc_curve`` is ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=True)`` for 0/1 labels, in numpy
  (one sort, one cumulative count): the IJB-C reference calls sklearn on 15.7 M pairs, which this matches
  point for point (thresholds decreasing, first threshold ``inf``);
* ``tar_at_far``: insightface ``ijb_11``'s rule: flip the curve, take the point nearest in FPR to each level
  (ties: the first after flipping, i.e. the higher TPR); levels are spelled as Python prints them ("1e-06",
  ..., "0.1"), the reference table's headers;
* ``plot_roc``: curves ``(label, fpr, tpr)`` on linear axes (LFW / CFP: the whole curve) or log-x FAR
  ``1e-6 .. 0.1`` (IJB-C: the low-FAR end is the result); written atomically;
* ``markdown_table``: header + rows, the one table writer (the IJB-C TAR table and the detector comparison).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from facepipe.io.atomic import atomic_path

FAR_LEVELS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_curve(labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numpy equivalent of ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...)`` for 0/1 labels.

    Returns (fpr, tpr, thresholds), thresholds decreasing, first threshold ``inf``.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError("labels and scores must be 1-D arrays of the same length")
    order = np.argsort(scores)[::-1]  # order within tied scores is irrelevant: only group ends are read
    sorted_scores = scores[order]
    sorted_positive = labels[order] == 1
    del order
    threshold_idxs = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tps = np.cumsum(sorted_positive, dtype=np.int64)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    thresholds = sorted_scores[threshold_idxs]
    if drop_intermediate and len(fps) > 2:
        # sklearn keeps a point unless both count sequences have zero second difference there.
        keep = np.r_[True, np.logical_or(np.diff(fps, 2) != 0, np.diff(tps, 2) != 0), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps = np.r_[0, fps]
    tps = np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
        tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def far_key(x: float) -> str:
    """Python's own spelling, as in the reference table headers: "1e-06", "1e-05", "0.0001", ..., "0.1"."""
    return repr(float(x))


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far_levels: Sequence[float] = FAR_LEVELS) -> dict[str, float]:
    """The reference rule: flip the curve, take the point nearest in FPR (first of ties = highest TPR)."""
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    return {far_key(x): float(tpr[int(np.argmin(np.abs(fpr - x)))]) for x in far_levels}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``| a | b |`` lines: the header, the ``|---|`` rule, one line per row (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def tar_table(rows: Sequence[tuple[str, dict[str, float]]], far_levels: Sequence[float] = FAR_LEVELS) -> str:
    """The IJB-C table: ``Methods | 1e-06 | ... | 0.1`` with TAR x 100, two decimals."""
    keys = [far_key(x) for x in far_levels]
    return markdown_table(["Methods", *keys], [[name, *(f"{tars[k] * 100:.2f}" for k in keys)] for name, tars in rows])


def plot_roc(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    title: str = "ROC",
    log_far: bool = False,
) -> Path:
    """One line per ``(label, fpr, tpr)`` curve to a PNG: linear axes, or (``log_far``) log-x FAR 1e-6 .. 0.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5) if log_far else (5.5, 5))
    for label, fpr, tpr in curves:
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        order = np.argsort(fpr, kind="stable")
        axis.plot(fpr[order], tpr[order], lw=1.2, label=label)
    if log_far:
        axis.set_xscale("log")
        axis.set_xlim(FAR_LEVELS[0], FAR_LEVELS[-1])
        axis.set_xticks(list(FAR_LEVELS))
        axis.grid(True, which="major", linestyle="--", linewidth=0.5)
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    else:
        axis.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle="--")
        axis.set_xlim(0, 1)
        axis.grid(True, linewidth=0.3)
        axis.legend(loc="lower right", fontsize=8)
    axis.set_ylim(0.0, 1.01)
    axis.set_xlabel("false accept rate")
    axis.set_ylabel("true accept rate")
    axis.set_title(title)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return Path(path)
