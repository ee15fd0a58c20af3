"""The 1:1 verification protocol of insightface's ``verification.py`` (LFW, CFP-FP, AgeDB-30 ...).

For ``P`` pairs with embeddings ``e1[i], e2[i]`` (each the sum of the crop's and its mirror's embedding, then
L2-normalised) and labels ``issame[i]``:

* distance = squared L2 between the normalised embeddings (0..4);
* accuracy: 10 folds in order, no shuffling (scikit-learn ``KFold(10, shuffle=False)``: the first ``P % 10``
  folds get one extra pair); for each fold the threshold from ``arange(0, 4, 0.01)`` with the best accuracy on
  the other nine folds (first one on ties) is applied to the fold ("same" when ``dist < threshold``); the
  result is the mean and (population) standard deviation of the ten fold accuracies;
* VAL@FAR=1e-3: per fold, on the nine training folds, the threshold from ``arange(0, 4, 0.001)`` at which the
  false accept rate reaches 1e-3, by linear interpolation of threshold against FAR; threshold 0 when FAR never
  reaches the target; VAL and FAR are then measured on the fold. insightface calls scipy
  ``interp1d(far, thresholds, kind='slinear')``; FAR values repeat, which current scipy refuses. The scipy
  versions insightface ran on built a degree-1 B-spline through the (stably sorted) points, repeats allowed:
  that interpolates between the last threshold of the run of FARs below the target and the first threshold
  above it (an exact hit gives the last threshold of its run). ``threshold_at_far`` computes exactly that;
* XNorm: the mean L2 norm of the raw (un-normalised) embeddings of the crops and of their mirrors.

Folds may also be given explicitly (``fold_ids``), e.g. the 10 official CFP splits; with the released .bin files
the ordered 10-fold split coincides with the official folds (LFW: 10 sets of 600 pairs).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from facepipe.embedding.base import l2_normalize
from facepipe.evaluation import metrics
from facepipe.io.atomic import atomic_write_text

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3

FoldSplit = tuple[np.ndarray, np.ndarray]  # (train indices, test indices)


def kfold_splits(n_items: int, n_folds: int = 10) -> list[FoldSplit]:
    """Ordered K-fold split, identical to scikit-learn ``KFold(n_folds, shuffle=False).split``."""
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    if n_items < n_folds:
        raise ValueError(f"cannot split {n_items} pairs into {n_folds} folds")
    sizes = np.full(n_folds, n_items // n_folds, dtype=np.int64)
    sizes[: n_items % n_folds] += 1
    indices = np.arange(n_items)
    splits, start = [], 0
    for size in sizes:
        test = indices[start : start + size]
        train = np.concatenate([indices[:start], indices[start + size :]])
        splits.append((train, test))
        start += size
    return splits


def group_splits(fold_ids: Sequence[int] | np.ndarray) -> list[FoldSplit]:
    """One fold per distinct ``fold_ids`` value (sorted): test on it, train on the rest."""
    fold_ids = np.asarray(fold_ids)
    groups = np.unique(fold_ids)
    if len(groups) < 2:
        raise ValueError("need pairs from at least 2 folds")
    return [(np.flatnonzero(fold_ids != g), np.flatnonzero(fold_ids == g)) for g in groups]


def pair_distances(embeddings1: np.ndarray, embeddings2: np.ndarray) -> np.ndarray:
    """Squared L2 distance between rows (inputs are expected L2-normalised)."""
    embeddings1 = np.asarray(embeddings1, dtype=np.float64)
    embeddings2 = np.asarray(embeddings2, dtype=np.float64)
    if embeddings1.shape != embeddings2.shape:
        raise ValueError(f"embedding shapes differ: {embeddings1.shape} vs {embeddings2.shape}")
    return np.sum(np.square(embeddings1 - embeddings2), axis=1)


def _confusion_counts(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, tn, fn for every threshold at once (prediction "same" when ``dist < threshold``)."""
    predict = dist[None, :] < thresholds[:, None]
    tp = np.count_nonzero(predict & issame, axis=1)
    fp = np.count_nonzero(predict & ~issame, axis=1)
    n_same = int(np.count_nonzero(issame))
    n_diff = len(issame) - n_same
    return tp, fp, n_diff - fp, n_same - tp


def accuracy_curve(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tpr, fpr, accuracy) per threshold; rates are 0 when undefined, as in insightface."""
    tp, fp, tn, fn = _confusion_counts(thresholds, dist, issame)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.where(tp + fn == 0, 0.0, tp / np.maximum(tp + fn, 1))
        fpr = np.where(fp + tn == 0, 0.0, fp / np.maximum(fp + tn, 1))
    accuracy = (tp + tn) / dist.size
    return tpr, fpr, accuracy


def threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at which the (non-decreasing) FAR curve reaches ``far_target``; 0 when it never does."""
    if far.max() < far_target:
        return 0.0
    below = np.flatnonzero(far <= far_target)
    if below.size == 0:  # FAR already above target at the smallest threshold: extrapolate as slinear cannot
        return float(thresholds[0])
    i = int(below[-1])
    if far[i] == far_target or i + 1 == len(far):
        return float(thresholds[i])
    f0, f1, t0, t1 = far[i], far[i + 1], thresholds[i], thresholds[i + 1]
    return float(t0 + (far_target - f0) * (t1 - t0) / (f1 - f0))


def val_far(threshold: float, dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(validation rate, false accept rate) at ``threshold``; NaN where a class is absent."""
    predict = dist < threshold
    n_same = int(np.count_nonzero(issame))
    n_diff = len(issame) - n_same
    val = np.count_nonzero(predict & issame) / n_same if n_same else float("nan")
    far = np.count_nonzero(predict & ~issame) / n_diff if n_diff else float("nan")
    return float(val), float(far)


@dataclass
class VerificationResult:
    """The figures insightface prints, plus what is needed to draw the ROC and report AUC / EER."""

    n_pairs: int
    n_folds: int
    accuracy: float
    accuracy_std: float
    fold_accuracies: list[float]
    best_thresholds: list[float]
    val: float
    val_std: float
    far: float
    auc: float
    eer: float
    tpr: list[float] = field(repr=False)  # mean over folds, per ACCURACY_THRESHOLDS entry
    fpr: list[float] = field(repr=False)

    def to_dict(self, with_curve: bool = False) -> dict:
        data = asdict(self)
        if not with_curve:
            data.pop("tpr")
            data.pop("fpr")
        return data


def _auc_eer(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Threshold-free AUC (probability a same pair is closer than a different pair) and equal error rate."""
    n_same = int(np.count_nonzero(issame))
    n_diff = len(issame) - n_same
    if n_same == 0 or n_diff == 0:
        return float("nan"), float("nan")
    order = np.argsort(dist, kind="stable")
    ranks = np.empty(len(dist), dtype=np.float64)
    # Average ranks for ties (Mann-Whitney U).
    sorted_dist = dist[order]
    _, first, counts = np.unique(sorted_dist, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    rank_sum_diff = ranks[~issame].sum() - n_diff * (n_diff - 1) / 2.0
    auc = rank_sum_diff / (n_same * n_diff)
    thresholds = np.concatenate([[-np.inf], np.unique(dist), [np.inf]])
    tp, fp, _, _ = _confusion_counts(thresholds, dist, issame)
    frr = 1.0 - tp / n_same
    far = fp / n_diff
    k = int(np.argmin(np.abs(frr - far)))
    return float(auc), float((frr[k] + far[k]) / 2.0)


def evaluate_distances(
    dist: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    fold_ids: Sequence[int] | np.ndarray | None = None,
    far_target: float = FAR_TARGET,
) -> VerificationResult:
    """The insightface protocol on precomputed squared distances (see module docstring)."""
    dist = np.asarray(dist, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if dist.shape != issame.shape:
        raise ValueError(f"{dist.size} distances but {issame.size} labels")
    splits = kfold_splits(len(dist), n_folds) if fold_ids is None else group_splits(fold_ids)
    tprs, fprs, accuracies, best, vals, fars = [], [], [], [], [], []
    for train, test in splits:
        _, _, train_accuracy = accuracy_curve(ACCURACY_THRESHOLDS, dist[train], issame[train])
        best_threshold = ACCURACY_THRESHOLDS[int(np.argmax(train_accuracy))]
        tpr, fpr, _ = accuracy_curve(ACCURACY_THRESHOLDS, dist[test], issame[test])
        tprs.append(tpr)
        fprs.append(fpr)
        accuracies.append(float(np.mean((dist[test] < best_threshold) == issame[test])))
        best.append(float(best_threshold))

        tp, fp, tn, _ = _confusion_counts(VAL_THRESHOLDS, dist[train], issame[train])
        train_far = fp / np.maximum(fp + tn, 1)
        threshold = threshold_at_far(train_far, VAL_THRESHOLDS, far_target)
        fold_val, fold_far = val_far(threshold, dist[test], issame[test])
        vals.append(fold_val)
        fars.append(fold_far)
    auc, eer = _auc_eer(dist, issame)
    return VerificationResult(
        n_pairs=len(dist),
        n_folds=len(splits),
        accuracy=float(np.mean(accuracies)),
        accuracy_std=float(np.std(accuracies)),
        fold_accuracies=accuracies,
        best_thresholds=best,
        val=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far=float(np.mean(fars)),
        auc=auc,
        eer=eer,
        tpr=np.mean(tprs, axis=0).tolist(),
        fpr=np.mean(fprs, axis=0).tolist(),
    )


def xnorm(*embedding_sets: np.ndarray) -> float:
    """Mean L2 norm over all rows of all the given raw embedding arrays."""
    norms = np.concatenate([np.linalg.norm(np.asarray(e, dtype=np.float64), axis=1) for e in embedding_sets])
    return float(norms.mean())


@dataclass
class BenchmarkReport:
    """Accuracy without flip and with flip (the headline number), XNorm, for one benchmark."""

    name: str
    xnorm: float
    flip: VerificationResult
    no_flip: VerificationResult

    def lines(self) -> list[str]:
        return [
            f"[{self.name}]XNorm: {self.xnorm:f}",
            f"[{self.name}]Accuracy: {self.no_flip.accuracy:1.5f}+-{self.no_flip.accuracy_std:1.5f}",
            f"[{self.name}]Accuracy-Flip: {self.flip.accuracy:1.5f}+-{self.flip.accuracy_std:1.5f}",
            f"[{self.name}]VAL@FAR={FAR_TARGET:g}: {self.flip.val:1.5f}+-{self.flip.val_std:1.5f} "
            f"(FAR {self.flip.far:1.5f})",
        ]

    def to_dict(self, with_curve: bool = False) -> dict:
        return {
            "name": self.name,
            "acc": self.flip.accuracy,
            "std": self.flip.accuracy_std,
            "xnorm": self.xnorm,
            "val": self.flip.val,
            "val_std": self.flip.val_std,
            "far": self.flip.far,
            "auc": self.flip.auc,
            "eer": self.flip.eer,
            "n_pairs": self.flip.n_pairs,
            "n_folds": self.flip.n_folds,
            "flip": self.flip.to_dict(with_curve),
            "no_flip": self.no_flip.to_dict(with_curve),
        }


def evaluate_embeddings(
    name: str,
    embeddings1: np.ndarray,
    embeddings1_flip: np.ndarray,
    embeddings2: np.ndarray,
    embeddings2_flip: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    fold_ids: Sequence[int] | np.ndarray | None = None,
) -> BenchmarkReport:
    """Evaluate pairs from raw embeddings of each side and of its mirror image.

    ``flip``: ``normalize(e + e_mirror)``; ``no_flip``: ``normalize(e)``; XNorm over all four arrays.
    """
    def unit(x: np.ndarray) -> np.ndarray:  # float64 after any flip sum, as the reference
        return l2_normalize(np.asarray(x, dtype=np.float64))

    no_flip = evaluate_distances(pair_distances(unit(embeddings1), unit(embeddings2)), issame, n_folds, fold_ids)
    flip = evaluate_distances(
        pair_distances(unit(embeddings1 + embeddings1_flip), unit(embeddings2 + embeddings2_flip)), issame, n_folds, fold_ids
    )
    return BenchmarkReport(
        name=name,
        xnorm=xnorm(embeddings1, embeddings2, embeddings1_flip, embeddings2_flip),
        flip=flip,
        no_flip=no_flip,
    )


def evaluate_interleaved(
    name: str, embeddings: np.ndarray, embeddings_flip: np.ndarray, issame: np.ndarray, n_folds: int = 10
) -> BenchmarkReport:
    """The .bin layout: rows ``2i`` and ``2i+1`` form pair ``i``."""
    return evaluate_embeddings(
        name, embeddings[0::2], embeddings_flip[0::2], embeddings[1::2], embeddings_flip[1::2], issame, n_folds
    )


def plot_roc(reports: Sequence[BenchmarkReport], path: str | os.PathLike, title: str = "ROC") -> Path:
    """ROC (TPR vs FPR, mean over folds, flip embeddings) of one or more benchmarks to a PNG."""
    curves = [
        (f"{r.name}: acc {r.flip.accuracy:.4f}, AUC {r.flip.auc:.4f}", np.asarray(r.flip.fpr), np.asarray(r.flip.tpr))
        for r in reports
    ]
    return metrics.plot_roc(curves, path, title)


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write JSON through a temporary file and a rename, so a report is never half-written."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
