"""The four checks of a training-set audit, on L2-normalised embeddings grouped by identity.

Notation: ``x`` an image's unit embedding, ``S_a`` the (robust) sum of identity ``a``'s embeddings, ``c_a =
S_a / ‖S_a‖`` its centre.

* **Robust centres.** A first centre from all of an identity's images; images whose similarity to it is below
  ``median − 3 × 1.4826 × MAD`` (of that identity's similarities) are left out of the final centre, so a
  handful of misfiled images do not drag it towards themselves.
* **Label noise.** ``score`` = cosine between ``x`` and its own identity's robust centre *without* ``x``
  (leave-one-out: ``(x·S_a − [x kept]·1) / ‖S_a − [x kept]·x‖``); ``best_other`` = the most similar other
  centre. Flagged when ``score < T_image``. Identities with one image have no leave-one-out centre: skipped
  and counted. Flagged when ``score < T_image`` and either ``best_other > score`` (it looks more like another
  identity: the usual misfiling) or ``score < T_reject`` (it looks like nobody in its folder, even when its true
  identity is not in the set), unless its own and its best other identity are a flagged duplicate pair (then the
  fault is the duplicate identity, reported there).
* **Duplicate identities.** Cosine between centres; each centre's nearest other centres. Flagged when
  ``≥ T_identity``.
* **Near-duplicate images.** Each image's nearest images (within and across identities). Flagged when
  ``≥ T_copy``.
* **Overlap with evaluation sets.** Evaluation identities' centres (or, without identities, their images)
  against the training centres. Flagged when ``≥ T_identity`` (centres) or ``≥ T_image`` (images).

**Thresholds come from the data** (each can be overridden; a set that lacks the same-person scores a threshold
is derived from — no identity with 2 images for ``T_image``, none with 4 for ``T_identity`` — is refused in one
line naming the override):

* ``T_image``: the equal-density boundary (Bayes with equal priors) between two normal fits with robust
  moments (median, 1.4826 × MAD): same-person image-to-centre scores (all leave-one-out ``score``s) and
  different-person ones (every image's ``best_other`` score — the nearest impostor, the hardest case);
* ``T_identity``: the same boundary between same-person centre pairs (the centres of the two halves of every
  identity with ≥ 4 images, images split alternately) and different-person ones (each centre's nearest
  other centre);
* ``T_reject``: ``median + 3 σ`` of the different-person scores, ``σ`` from their lower half only (``1.4826 ×``
  the median distance below the median): the upper tail holds the faults themselves (copies, split
  identities); at most ``T_image``;
* ``T_copy``: ``median + 6 × 1.4826 × MAD`` of the same-person nearest-image similarities, clipped to
  ``COPY_RANGE`` = ``[0.88, 0.90]``. On real sets the robust rule lands above the clip (the same-person nearest
  image has a long upper tail: several shots of one session), so in practice ``T_copy`` is the upper bound, a
  property of the model more than of the data: copies of one photo (downscaled, cropped, re-encoded, then
  re-detected and re-aligned) score 0.80–0.99, median 0.96, and ≥ 0.90 for 93–96 % of them with the bundled
  MobileFaceNet (``eval/make_noisy_training_set.py``, three seeds). An embedding cannot tell such a copy from
  another photo of the same person taken moments apart, nor from a different shot of one session: of CFP's own
  flagged pairs (200 identities, by eye) 25 of 38 between 0.90 and 0.955 are different photos, 3 of 36 above;
  ``near_duplicates`` is a review list ranked by similarity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from facepipe.audit.neighbours import Neighbours, nearest
from facepipe.embedding.base import l2_normalize

MAD_SCALE = 1.4826  # MAD of a normal distribution × this = its standard deviation
COPY_RANGE = (0.88, 0.90)  # T_copy's clip: re-aligned copies of one photo score >= 0.90 (module docstring)
BLOCK = 65_536  # rows per streamed block: float64 temporaries of ~270 MB at 512-d


@dataclass
class Thresholds:
    image: float
    identity: float
    copy: float
    reject: float
    how: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ statistics


def robust_moments(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 × MAD) of the finite values; the spread falls back to the std, then 1e-3."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    median = float(np.median(values))
    spread = MAD_SCALE * float(np.median(np.abs(values - median)))
    if spread <= 0:
        spread = float(np.std(values)) or 1e-3
    return median, spread


def equal_density_boundary(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Where the normal fits (robust moments) of the two score sets have equal density, between their medians."""
    m1, s1 = robust_moments(genuine)
    m0, s0 = robust_moments(impostor)
    if not (math.isfinite(m1) and math.isfinite(m0)):
        raise ValueError("need both same-person and different-person scores to derive a threshold")
    if m1 <= m0:
        return (m1 + m0) / 2.0
    # log N(x; m1, s1) = log N(x; m0, s0)  <=>  a x² + b x + c = 0
    a = 1.0 / (2 * s0**2) - 1.0 / (2 * s1**2)
    b = m1 / s1**2 - m0 / s0**2
    c = m0**2 / (2 * s0**2) - m1**2 / (2 * s1**2) + math.log(s0 / s1)
    if abs(a) < 1e-12:
        roots = [-c / b]
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b + math.sqrt(disc)) / (2 * a), (-b - math.sqrt(disc)) / (2 * a)]
    between = [r for r in roots if m0 <= r <= m1]
    return float(between[0]) if between else (m1 + m0) / 2.0


# ------------------------------------------------------------------------------------------------ centres


def identity_sums(vectors: np.ndarray, identity: np.ndarray, n_identities: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-identity float64 sums of the rows (times ``weights``, 0/1) and counts, streamed in blocks (rows
    may be a memory map or float16). Rows with identity −1 are ignored."""
    sums = np.zeros((n_identities, vectors.shape[1]), dtype=np.float64)
    counts = np.zeros(n_identities, dtype=np.int64)
    for start in range(0, len(vectors), BLOCK):
        ids = identity[start : start + BLOCK]
        w = None if weights is None else weights[start : start + BLOCK].astype(np.float64)
        keep = (ids >= 0) if w is None else (ids >= 0) & (w > 0)
        if not keep.any():
            continue
        take = np.flatnonzero(keep)
        take = take[np.argsort(ids[take], kind="stable")]  # by identity, in row order within one
        sorted_ids = ids[take]
        rows = np.asarray(vectors[start : start + BLOCK])[take].astype(np.float64)  # one gather, then widen (exact)
        if w is not None:
            rows *= w[take, None]
        bounds = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1], True])
        sums[sorted_ids[bounds[:-1]]] += _segment_sums(rows, bounds)
        counts[sorted_ids[bounds[:-1]]] += np.diff(bounds)
    return sums, counts


def _segment_sums(rows: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """``np.add.reduceat(rows, bounds[:-1], axis=0)``, to the bit (the same row-by-row order), one reduce per
    segment: reduceat strides down each column of a wide matrix (measured 35× slower at 65,536 × 512)."""
    out = np.empty((len(bounds) - 1, rows.shape[1]), dtype=rows.dtype)
    for i, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        np.add.reduce(rows[lo:hi], axis=0, out=out[i])
    return out


def unit_rows(sums: np.ndarray) -> np.ndarray:
    return l2_normalize(sums).astype(np.float32)


def row_dots(vectors: np.ndarray, identity: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``vectors[i] · table[identity[i]]`` for every row, in blocks (NaN where identity is −1)."""
    out = np.full(len(vectors), np.nan)
    for start in range(0, len(vectors), BLOCK):
        ids = identity[start : start + BLOCK]
        ok = ids >= 0
        rows = np.asarray(vectors[start : start + BLOCK][ok], dtype=np.float64)
        out[start : start + BLOCK][ok] = np.einsum("ij,ij->i", rows, table[ids[ok]])
    return out


@dataclass
class Centres:
    sums: np.ndarray  # (I, D) float64 robust sums
    counts: np.ndarray  # (I,) images in the robust sums
    kept: np.ndarray  # (N,) bool: the image is in its identity's robust sum
    unit: np.ndarray  # (I, D) float32 robust centres

    @property
    def valid(self) -> np.ndarray:
        return self.counts > 0


def robust_centres(vectors: np.ndarray, identity: np.ndarray, n_identities: int) -> Centres:
    """Centres without the outliers of each identity (module docstring)."""
    first_sums, _ = identity_sums(vectors, identity, n_identities)
    similarity = row_dots(vectors, identity, l2_normalize(first_sums))
    kept = np.zeros(len(vectors), dtype=bool)
    valid = identity >= 0
    order = np.argsort(identity[valid], kind="stable")
    rows = np.flatnonzero(valid)[order]
    ids = identity[rows]
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        group = rows[lo:hi]
        values = similarity[group]
        median = np.median(values)
        mad = MAD_SCALE * np.median(np.abs(values - median))
        kept[group] = values >= median - 3 * mad if mad > 0 else True
    sums, counts = identity_sums(vectors, identity, n_identities, kept.astype(np.float64))
    return Centres(sums, counts, kept, unit_rows(sums))


# ------------------------------------------------------------------------------------------------ checks


@dataclass
class LabelNoise:
    score: np.ndarray  # (N,) leave-one-out similarity to the own centre; NaN for singletons / no identity
    best_other: np.ndarray  # (N,) index of the most similar other identity (−1 if none)
    best_other_score: np.ndarray  # (N,)
    neighbours: Neighbours


def leave_one_out_scores(vectors: np.ndarray, identity: np.ndarray, centres: Centres) -> np.ndarray:
    """Every image's similarity to its own identity's robust centre without it (NaN: singletons, no identity)."""
    dot = row_dots(vectors, identity, centres.sums)  # x · S_a
    self_term = centres.kept.astype(np.float64)
    counts = np.where(identity >= 0, centres.counts[np.maximum(identity, 0)], 0) - self_term
    sq_norm = np.zeros(len(vectors))
    ok = identity >= 0
    sq_norm[ok] = np.einsum("ij,ij->i", centres.sums, centres.sums)[identity[ok]]
    # ‖S − x‖² = ‖S‖² − 2 x·S + 1 for a kept unit x; ‖S‖² for an excluded one
    loo_norm = np.sqrt(np.maximum(sq_norm - 2 * self_term * dot + self_term, 0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((counts >= 1) & (loo_norm > 1e-9), (dot - self_term) / loo_norm, np.nan)


def label_noise(vectors: np.ndarray, identity: np.ndarray, centres: Centres, score: np.ndarray | None = None, **search: float) -> LabelNoise:
    """Leave-one-out own-centre scores (``score`` when already computed) and the most similar other centre of
    every image."""
    score = leave_one_out_scores(vectors, identity, centres) if score is None else score
    found = nearest(vectors, centres.unit, k=2, **search)
    other_col = np.where(found.indices[:, 0] == identity, 1, 0)
    rows = np.arange(len(vectors))
    best_other = found.indices[rows, other_col]
    best_other_score = found.similarities[rows, other_col].astype(np.float64)
    best_other_score[best_other < 0] = np.nan
    return LabelNoise(score, best_other, best_other_score, found)


def split_half_similarities(vectors: np.ndarray, identity: np.ndarray, n_identities: int) -> np.ndarray:
    """Same-person centre-pair similarities: the centres of the alternate halves of every identity with ≥ 4 images."""
    valid = identity >= 0
    order = np.argsort(identity[valid], kind="stable")
    rows = np.flatnonzero(valid)[order]
    ids = identity[rows]
    rank = np.arange(len(rows)) - np.searchsorted(ids, ids, side="left")  # position inside the identity
    half = np.zeros(len(vectors), dtype=bool)
    half[rows] = rank % 2 == 1
    counts = np.bincount(ids, minlength=n_identities)
    even, _ = identity_sums(vectors, identity, n_identities, (~half).astype(np.float64))
    odd, _ = identity_sums(vectors, identity, n_identities, half.astype(np.float64))
    enough = counts >= 4
    return np.einsum("ij,ij->i", l2_normalize(even[enough]), l2_normalize(odd[enough]))


def derive_thresholds(
    noise: LabelNoise,
    centre_neighbours: Neighbours,
    split_half: np.ndarray,
    image_neighbours: Neighbours,
    identity: np.ndarray,
    overrides: dict[str, float | None] | None = None,
) -> Thresholds:
    """The three thresholds from the data's own score distributions (module docstring), unless overridden."""
    overrides = overrides or {}
    how: dict[str, str] = {}

    needs = {  # what a threshold's same-person scores come from, for the one-line refusal when a set has none
        "image": "no identity has 2 or more usable images",
        "identity": "no identity has 4 or more usable images (its split-half centres are the same-person pairs)",
    }

    def pick(name: str, derive, rule: str) -> float:
        if overrides.get(name) is not None:
            how[name] = "given"
            return float(overrides[name])
        how[name] = rule
        try:
            return float(derive())
        except ValueError:
            raise ValueError(f"cannot derive T_{name} from this set: {needs.get(name, 'its scores are missing')}; give --{name}-threshold") from None

    image = pick(
        "image",
        lambda: equal_density_boundary(noise.score, noise.best_other_score),
        "equal-density boundary: leave-one-out own-centre scores vs nearest other centre",
    )
    other_centre = centre_neighbours.similarities[:, 1] if centre_neighbours.similarities.shape[1] > 1 else np.array([])
    identity_t = pick(
        "identity",
        lambda: equal_density_boundary(split_half, other_centre[np.isfinite(other_centre)]),
        "equal-density boundary: split-half centre pairs vs nearest other centre",
    )

    def copy_threshold() -> float:
        sims, ids = image_neighbours.similarities[:, 1:], image_neighbours.indices[:, 1:]
        same = (ids >= 0) & (identity[np.maximum(ids, 0)] == identity[:, None]) & (identity[:, None] >= 0)
        first_same = np.where(same.any(axis=1), sims[np.arange(len(sims)), same.argmax(axis=1)], np.nan)
        median, spread = robust_moments(first_same)
        return float(np.clip(median + 6 * spread, *COPY_RANGE)) if math.isfinite(median) else COPY_RANGE[1]

    copy = pick("copy", copy_threshold, f"median + 6 robust sigma of nearest same-person image similarities, clipped to {list(COPY_RANGE)}")

    def reject_threshold() -> float:
        scores = noise.best_other_score[np.isfinite(noise.best_other_score)]
        median = float(np.median(scores))
        below = median - scores[scores <= median]
        return min(image, median + 3 * MAD_SCALE * float(np.median(below)))

    reject = pick("reject", reject_threshold, "median + 3 lower-half robust sigma of nearest-other-centre scores, at most T_image")
    return Thresholds(image, identity_t, copy, reject, how)


def near_duplicate_pairs(neighbours: Neighbours, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique pairs ``(a < b)`` among each image's neighbours with similarity ≥ ``threshold``."""
    n, k = neighbours.indices.shape
    a = np.repeat(np.arange(n), k)
    b = neighbours.indices.reshape(-1)
    s = neighbours.similarities.reshape(-1)
    keep = (b >= 0) & (a != b) & (s >= threshold)
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * np.int64(n) + hi, return_index=True)
    return lo[first], hi[first], s[first]
