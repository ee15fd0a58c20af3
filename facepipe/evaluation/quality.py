"""Face quality measures and error-versus-reject curves (ISO/IEC 29794-1, Grother & Tabassi 2007).

A quality score is good when rejecting the faces it rates lowest removes the comparisons that fail. The
error-versus-reject curve (EVRC) measures exactly that, on a verification protocol:

* **threshold**: the comparison threshold at a fixed false match rate (FMR), set once on *all* non-mated
  pairs before any rejection (so the curve shows what quality buys at an operating point, not a re-tuned one);
* **rejection**: for a fraction ``r`` of faces, the ``r`` lowest-quality faces are rejected (ties broken by
  the face index, so the order is deterministic); a pair is rejected when either of its faces is;
* **error**: the false non-match rate (FNMR) of the mated pairs left, at the fixed threshold;
* **curves**: one per quality measure, plus the *oracle* (a face's quality = minus the number of failed mated
  comparisons it takes part in, ties by its lowest mated score: the faces behind the most failures go first,
  a near-ideal that no real measure should beat by much) and *random* rejection (the mean over seeds: what a
  measure that knows nothing does);
* **area**: the area under each curve over ``r`` in ``[0, max_reject]`` (trapezoidal), divided by
  ``max_reject``: the mean FNMR over the rejection range; lower is better;
* **too few pairs**: where fewer than ``max(10, 1 %)`` of the mated pairs are left, FNMR is not defined (NaN:
  a handful of pairs gives 0 or 1 by chance — on CFP-FP, where every pair holds a profile face, a measure that
  rejects profiles first runs out of pairs at a third of the faces); the area then covers the defined part.

The per-face measures are ``facepipe.quality``'s (also stored in the align and embedding manifests).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np

from facepipe.quality import face_measures
DEFAULT_FMR = 1e-3
DEFAULT_MAX_REJECT = 0.5


# ------------------------------------------------------------------------------------------------ EVRC


def threshold_at_fmr(scores: np.ndarray, issame: np.ndarray, fmr: float) -> float:
    """The lowest similarity threshold at which at most ``fmr`` of the non-mated pairs score *above* it
    (a pair matches when ``score > threshold``)."""
    from facepipe.index.thresholds import threshold_at_far  # the (floor(fmr n) + 1)-th largest non-mated score

    non_mated = np.asarray(scores, dtype=np.float64)[~np.asarray(issame, dtype=bool)]
    if len(non_mated) == 0:
        raise ValueError("no non-mated pairs: cannot set a threshold at a false match rate")
    return threshold_at_far(non_mated, fmr)


def rejection_ranks(quality: np.ndarray) -> np.ndarray:
    """Each face's position in rejection order (0 = rejected first): ascending quality, NaN first (an unknown
    quality is not trusted), ties by face index."""
    quality = np.asarray(quality, dtype=np.float64)
    key = np.where(np.isnan(quality), -np.inf, quality)
    order = np.lexsort((np.arange(len(key)), key))
    ranks = np.empty(len(key), dtype=np.int64)
    ranks[order] = np.arange(len(key))
    return ranks


@dataclass
class RejectCurve:
    """FNMR at a fixed threshold after rejecting each fraction of the lowest-quality faces."""

    name: str
    reject_fractions: list[float]
    fnmr: list[float]
    pairs_kept: list[int]
    area: float

    def to_dict(self) -> dict:
        return asdict(self)


def reject_curve(
    name: str,
    quality: np.ndarray,
    pair_faces: np.ndarray,
    scores: np.ndarray,
    issame: np.ndarray,
    threshold: float,
    fractions: np.ndarray,
) -> RejectCurve:
    """The EVRC of one per-face ``quality`` over ``pair_faces`` ``(P, 2)`` face indices (module docstring)."""
    ranks = rejection_ranks(quality)
    pair_rank = ranks[pair_faces].min(axis=1)  # a pair goes when its first face goes
    mated = np.asarray(issame, dtype=bool)
    failed = mated & ~(np.asarray(scores, dtype=np.float64) > threshold)
    n_faces = len(quality)
    enough = max(10, int(np.ceil(0.01 * np.sum(mated))))
    fnmr, kept = [], []
    for fraction in fractions:
        rejected = int(np.floor(fraction * n_faces + 1e-9))
        keep = pair_rank >= rejected
        mated_kept = int(np.sum(keep & mated))
        kept.append(int(np.sum(keep)))
        fnmr.append(float(np.sum(keep & failed) / mated_kept) if mated_kept >= min(enough, int(np.sum(mated))) else float("nan"))
    return RejectCurve(name, [float(f) for f in fractions], fnmr, kept, curve_area(fractions, np.array(fnmr)))


def curve_area(fractions: np.ndarray, fnmr: np.ndarray) -> float:
    """Mean FNMR over the defined (finite) prefix of the curve."""
    defined = np.isfinite(fnmr)
    last = int(np.argmin(defined)) if not defined.all() else len(fnmr)
    if last <= 1:
        return float(fnmr[0]) if last == 1 else float("nan")
    span = float(fractions[last - 1] - fractions[0])
    return float(np.trapezoid(fnmr[:last], fractions[:last]) / span)


def oracle_quality(n_faces: int, pair_faces: np.ndarray, scores: np.ndarray, issame: np.ndarray, threshold: float) -> np.ndarray:
    """Minus each face's count of failed mated comparisons at ``threshold``, ties broken by its lowest mated
    score (squashed into (−0.5, 0.5) so it never outweighs one failure)."""
    scores = np.asarray(scores, dtype=np.float64)
    mated = np.asarray(issame, dtype=bool)
    failed = mated & ~(scores > threshold)
    failures = np.zeros(n_faces)
    lowest = np.full(n_faces, np.inf)
    for column in (0, 1):
        np.add.at(failures, pair_faces[failed, column], 1.0)
        np.minimum.at(lowest, pair_faces[mated, column], scores[mated])
    return -failures + 0.5 * np.tanh(lowest)


@dataclass
class QualityReport:
    """EVRCs of every measure, the oracle and random rejection, at one operating point."""

    fmr: float
    threshold: float
    baseline_fnmr: float
    curves: list[RejectCurve] = field(default_factory=list)

    def ranking(self) -> list[tuple[str, float]]:
        """Measures by area under the EVRC (best first), oracle and random included."""
        return sorted(((c.name, c.area) for c in self.curves), key=lambda item: (np.isnan(item[1]), item[1]))

    def to_dict(self) -> dict:
        return {
            "fmr": self.fmr,
            "threshold": self.threshold,
            "baseline_fnmr": self.baseline_fnmr,
            "ranking": [{"measure": name, "area": area} for name, area in self.ranking()],
            "curves": [c.to_dict() for c in self.curves],
        }


def error_versus_reject(
    measures: Mapping[str, np.ndarray],
    pair_faces: np.ndarray,
    scores: np.ndarray,
    issame: np.ndarray,
    fmr: float = DEFAULT_FMR,
    max_reject: float = DEFAULT_MAX_REJECT,
    steps: int = 51,
    random_seeds: int = 10,
) -> QualityReport:
    """EVRCs of each measure (``{name: (n_faces,) quality}``) for pairs ``(P, 2)`` of face indices with
    similarity ``scores`` (higher = more alike) and ``issame`` labels."""
    pair_faces = np.asarray(pair_faces, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if pair_faces.ndim != 2 or pair_faces.shape[1] != 2 or len(pair_faces) != len(scores) or len(scores) != len(issame):
        raise ValueError("pair_faces must be (P, 2) with one score and one label per pair")
    if not np.isfinite(scores).all():
        raise ValueError("comparison scores must be finite")
    if not issame.any():
        raise ValueError("no mated pairs: FNMR is undefined")
    n_faces = int(pair_faces.max()) + 1 if len(pair_faces) else 0
    for name, quality in measures.items():
        if len(quality) < n_faces:
            raise ValueError(f"measure {name!r} has {len(quality)} values for {n_faces} faces")
    if not 0 < max_reject < 1:
        raise ValueError("max_reject must be within (0, 1)")
    threshold = threshold_at_fmr(scores, issame, fmr)
    fractions = np.linspace(0.0, max_reject, steps)
    curves = [reject_curve(name, np.asarray(q)[:n_faces], pair_faces, scores, issame, threshold, fractions) for name, q in measures.items()]
    curves.append(reject_curve("oracle", oracle_quality(n_faces, pair_faces, scores, issame, threshold), pair_faces, scores, issame, threshold, fractions))
    rng = np.random.default_rng(0)
    randoms = [reject_curve("random", rng.random(n_faces), pair_faces, scores, issame, threshold, fractions) for _ in range(random_seeds)]
    mean_fnmr = np.mean([c.fnmr for c in randoms], axis=0)
    curves.append(RejectCurve("random", [float(f) for f in fractions], mean_fnmr.tolist(), randoms[0].pairs_kept, curve_area(fractions, mean_fnmr)))
    baseline = float(np.mean(~(scores[issame] > threshold)))
    return QualityReport(fmr, threshold, baseline, curves)


def plot_error_versus_reject(report: QualityReport, path: str, title: str = "Error versus reject") -> None:
    """The EVRCs in one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from facepipe.io.atomic import atomic_path

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for curve in report.curves:
        style = {"oracle": ":", "random": "--"}.get(curve.name, "-")
        axes.plot(curve.reject_fractions, curve.fnmr, style, label=f"{curve.name} (area {curve.area:.4f})")
    axes.set_xlabel("fraction of faces rejected (lowest quality first)")
    axes.set_ylabel(f"FNMR at FMR {report.fmr:g} (threshold {report.threshold:.3f})")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ on a protocol


def pair_measures(
    embeddings: np.ndarray,
    faces: np.ndarray,
    crops: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-face measures from a verification pipeline's outputs: ``embeddings`` ``(N, D)`` raw (flip-summed),
    ``faces`` ``(N, 15)`` reference rows (box, score, landmarks; NaN rows where no face was found — those faces
    get NaN quality and are rejected first), optional aligned ``crops`` for sharpness."""
    faces = np.asarray(faces, dtype=np.float64)
    landmarks = faces[:, 5:15].reshape(-1, 5, 2)
    return face_measures(faces[:, 4], embeddings, landmarks, crops)


def cosine_scores(embeddings: np.ndarray, pair_faces: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair's L2-normalised embeddings."""
    from facepipe.embedding.base import l2_normalize

    unit = l2_normalize(np.asarray(embeddings, dtype=np.float64))
    return np.sum(unit[pair_faces[:, 0]] * unit[pair_faces[:, 1]], axis=1)


def template_measures(image_measures: Mapping[str, np.ndarray], image_rows: np.ndarray, n_templates: int) -> dict[str, np.ndarray]:
    """Per-template quality for template-based protocols (IJB-C 1:1): the mean of its images' finite values (NaN
    when it has none). A pair is then rejected when either template is."""
    out = {}
    for name, values in image_measures.items():
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        sums = np.bincount(image_rows[finite], weights=values[finite], minlength=n_templates)
        counts = np.bincount(image_rows[finite], minlength=n_templates)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[name] = np.where(counts > 0, sums / counts, np.nan)
    return out
