"""Run the four checks over a training set (and evaluation sets) and write the audit's outputs.

Outputs in ``out_dir`` (each table as ``.csv`` and ``.parquet``, most suspicious first; all written atomically):

- ``label_noise``: ``path, identity, score, best_other_identity, best_other_score, flagged``;
- ``duplicate_identities``: ``identity_a, identity_b, similarity, flagged`` (each centre's nearest centres);
- ``near_duplicates``: ``path_a, path_b, similarity, flagged`` (pairs within 0.05 of the threshold or above);
- ``overlap``: ``identity, against, other, similarity, flagged`` (``other``: the evaluation identity, or the
  image when the evaluation set has none);
- ``summary.json``: counts, thresholds and how each was chosen, the neighbour search used and its recall, and
  each stage's wall and CPU seconds and the peak RSS at its end (``stages``);
- ``report.html`` (``facepipe.audit.report``).
"""

from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from facepipe.audit.checks import (
    Thresholds,
    derive_thresholds,
    equal_density_boundary,
    label_noise,
    near_duplicate_pairs,
    robust_centres,
)
from facepipe.audit.data import EmbeddingSet, check_same_model
from facepipe.audit.identities import identity_statistics
from facepipe.audit.neighbours import exact_top_k, image_neighbours, nearest

TABLES = ("label_noise", "duplicate_identities", "near_duplicates", "overlap")
CENTRE_NEIGHBOURS = 5
IMAGE_NEIGHBOURS = 5
NEAR_MARGIN = 0.05


def peak_rss_gb() -> float:
    """This process's peak resident set (GB): ``VmHWM``, the high-water mark of its own address space, where Linux
    has it. ``ru_maxrss`` is the fallback only: it carries over the parent's peak into a process started from it
    (``execve`` keeps the larger of the two), so a benchmark's child would report its parent's memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


@dataclass
class Stages:
    """Wall seconds, CPU seconds (this process's, all threads: on shared cores the steadier figure) and the
    process's peak RSS (GB) at the end of each stage: where time and memory go."""

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_gb: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str):
        started, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)
        self.cpu_seconds[name] = round(time.process_time() - cpu, 2)
        self.peak_rss_gb[name] = round(peak_rss_gb(), 3)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {"seconds": dict(self.seconds), "cpu_seconds": dict(self.cpu_seconds), "peak_rss_gb": dict(self.peak_rss_gb)}


@dataclass
class AuditResult:
    tables: dict[str, pd.DataFrame]
    thresholds: Thresholds
    summary: dict[str, Any] = field(default_factory=dict)


def audit(
    train: EmbeddingSet,
    against: Sequence[EmbeddingSet] = (),
    overrides: dict[str, float | None] | None = None,
    exact_limit: float | None = None,
    engine: str = "local",
    ray_options: Any = None,
) -> AuditResult:
    """Every check on ``train`` (and its overlap with each of ``against``). ``engine``: where the per-identity
    work runs (``facepipe.audit.identities``): "local" (this process) or "ray" (``ray_options``, a ``RayOptions``)."""
    started = time.perf_counter()
    for other in against:
        check_same_model(train, other)
    search = {} if exact_limit is None else {"exact_limit": exact_limit}
    stage = Stages()
    n_ids = len(train.names)
    counts = np.bincount(train.identity[train.identity >= 0], minlength=n_ids)
    with stage("centres"):  # and every other per-identity statistic, on the chosen engine
        per_identity = identity_statistics(train.vectors, train.identity, n_ids, engine, ray_options)
        centres, split = per_identity.centres, per_identity.split_half
    with stage("label_noise"):
        noise = label_noise(train.vectors, train.identity, centres, per_identity.score, **search)
    with stage("duplicate_identities"):
        centre_nn = nearest(centres.unit, centres.unit, k=CENTRE_NEIGHBOURS + 1, **search)
    with stage("near_duplicates"):
        image_nn = image_neighbours(train.vectors, _image_cells(train, centres.unit, noise), k=IMAGE_NEIGHBOURS + 1, **search)
    with stage("tables"):
        thresholds = derive_thresholds(noise, centre_nn, split, image_nn, train.identity, overrides)
        duplicates = _duplicate_table(train, centre_nn, thresholds)
        tables = {
            "label_noise": _label_noise_table(train, noise, thresholds, duplicates),
            "duplicate_identities": duplicates,
            "near_duplicates": _near_duplicate_table(train, image_nn, thresholds),
        }
    with stage("overlap"):
        tables["overlap"] = _overlap_table(train, centres.unit, against, thresholds, search)
    summary = {
        "images": int(len(train.vectors)),
        "identities": int(n_ids),
        "skipped": dict(train.skipped),
        "single_image_identities": int(np.sum(counts == 1)),
        "flagged": {name: int(table["flagged"].sum()) for name, table in tables.items()},
        "rows": {name: int(len(table)) for name, table in tables.items()},
        "thresholds": thresholds.to_dict(),
        "search": {
            "image_to_centre": {"method": noise.neighbours.method, "recall_at_2": noise.neighbours.recall},
            "centre_to_centre": {"method": centre_nn.method, "recall": centre_nn.recall},
            "image_to_image": {"method": image_nn.method, "recall": image_nn.recall},
        },
        "against": [{"name": o.name, "images": int(len(o.vectors)), "identities": len(o.names), "skipped": dict(o.skipped)} for o in against],
        "seconds": round(time.perf_counter() - started, 2),
        "stages": stage.to_dict(),
    }
    return AuditResult(tables, thresholds, summary)


def _image_cells(train: EmbeddingSet, centres: np.ndarray, noise) -> np.ndarray:
    """The cells each image is searched in (``facepipe.audit.neighbours``): its own identity, the 2 nearest
    centres the label-noise search found, and, for an image that search found no plausible centre for (its own
    score and its best found centre both below the same-versus-different boundary: an IVF miss, or a person not
    in the set), its exact nearest centre. A copy filed under another identity then shares its source's cell
    even where the inverted file missed that centre (measured on the synthetic 500k set: the IVF's top centre
    was the exact one for 92 % of the images)."""
    found = noise.neighbours
    cells = np.column_stack([train.identity, found.indices, np.full(len(train.identity), -1)])
    try:
        plausible = equal_density_boundary(noise.score, noise.best_other_score)
    except ValueError:  # no same-person or no different-person scores: nothing to judge a centre by
        return cells
    lost = np.flatnonzero(~(np.fmax(noise.score, found.similarities[:, 0]) >= plausible))
    for start in range(0, len(lost), 1024):  # 1024 queries × 32768 centres of float32: 128 MB of similarities
        rows = lost[start : start + 1024]
        cells[rows, -1] = exact_top_k(train.vectors[rows], centres, 1)[1][:, 0]
    return cells


def _label_noise_table(train: EmbeddingSet, noise, thresholds: Thresholds, duplicates: pd.DataFrame) -> pd.DataFrame:
    names = np.array(train.names, dtype=object)
    valid = np.isfinite(noise.score)
    other = noise.best_other
    table = pd.DataFrame(
        {
            "path": np.array(train.paths, dtype=object)[valid],
            "identity": names[train.identity[valid]],
            "score": noise.score[valid].astype(np.float32),
            "best_other_identity": np.where(other[valid] >= 0, names[np.maximum(other[valid], 0)], ""),
            "best_other_score": noise.best_other_score[valid].astype(np.float32),
        }
    )
    suspicious = (table["score"] < thresholds.image) & (
        (table["best_other_score"] > table["score"]) | (table["score"] < thresholds.reject)
    )
    flagged_pairs = duplicates.loc[duplicates["flagged"], ["identity_a", "identity_b"]].itertuples(index=False)
    same_person = {frozenset(pair) for pair in flagged_pairs}
    explained = [frozenset((a, b)) in same_person for a, b in zip(table["identity"], table["best_other_identity"])]
    table["flagged"] = suspicious & ~np.array(explained, dtype=bool)
    return table.sort_values(["score", "path"], kind="stable").reset_index(drop=True)


def _duplicate_table(train: EmbeddingSet, centre_nn, thresholds: Thresholds) -> pd.DataFrame:
    n, k = centre_nn.indices.shape
    a = np.repeat(np.arange(n), k)
    b = centre_nn.indices.reshape(-1)
    s = centre_nn.similarities.reshape(-1)
    keep = (b >= 0) & (a != b)
    lo, hi, s = np.minimum(a, b)[keep], np.maximum(a, b)[keep], s[keep]
    _, first = np.unique(lo * np.int64(max(n, 1)) + hi, return_index=True)
    names = np.array(train.names, dtype=object)
    table = pd.DataFrame({"identity_a": names[lo[first]], "identity_b": names[hi[first]], "similarity": s[first].astype(np.float32)})
    table["flagged"] = table["similarity"] >= thresholds.identity
    return table.sort_values(["similarity", "identity_a"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _near_duplicate_table(train: EmbeddingSet, image_nn, thresholds: Thresholds) -> pd.DataFrame:
    a, b, s = near_duplicate_pairs(image_nn, thresholds.copy - NEAR_MARGIN)
    paths = np.array(train.paths, dtype=object)
    table = pd.DataFrame({"path_a": paths[a], "path_b": paths[b], "similarity": s.astype(np.float32)})
    table["flagged"] = table["similarity"] >= thresholds.copy
    return table.sort_values(["similarity", "path_a"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _overlap_table(train: EmbeddingSet, centres: np.ndarray, against: Sequence[EmbeddingSet], thresholds: Thresholds, search) -> pd.DataFrame:
    names = np.array(train.names, dtype=object)
    frames = []
    for other in against:
        if other.has_identities:
            other_centres = robust_centres(other.vectors, other.identity, len(other.names)).unit
            labels = np.array(other.names, dtype=object)
            threshold = thresholds.identity
        else:
            other_centres, labels, threshold = other.vectors, np.array(other.paths, dtype=object), thresholds.image
        found = nearest(other_centres, centres, k=1, **search)
        hit = found.indices[:, 0]
        ok = hit >= 0
        frames.append(
            pd.DataFrame(
                {
                    "identity": names[hit[ok]],
                    "against": other.name,
                    "other": labels[ok],
                    "similarity": found.similarities[ok, 0].astype(np.float32),
                    "flagged": found.similarities[ok, 0] >= threshold,
                }
            )
        )
    if not frames:
        return pd.DataFrame({"identity": [], "against": [], "other": [], "similarity": np.zeros(0, np.float32), "flagged": np.zeros(0, bool)})
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["similarity", "identity"], ascending=[False, True], kind="stable").reset_index(drop=True)


def write_outputs(result: AuditResult, out_dir: str | Path) -> list[Path]:
    """The tables (csv + parquet) and ``summary.json``, each written atomically."""
    from facepipe.io.atomic import atomic_path, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in TABLES:
        table = result.tables[name]
        with atomic_path(out_dir / f"{name}.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
        with atomic_path(out_dir / f"{name}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        written += [out_dir / f"{name}.csv", out_dir / f"{name}.parquet"]
    atomic_write_text(out_dir / "summary.json", json.dumps(result.summary, indent=1, default=float))
    written.append(out_dir / "summary.json")
    return written


def clean_list(train: EmbeddingSet, result: AuditResult, drop_overlap: bool = True) -> list[str]:
    """The training crops without flagged items: label-noise images, the second image of every flagged
    near-duplicate pair, and (``drop_overlap``) every image of an identity that overlaps an evaluation set.
    Paths relative to the aligned folder, for ``facepipe align LIST --root ALIGNED``."""
    drop = set(result.tables["label_noise"].loc[lambda t: t["flagged"], "path"])
    drop |= set(result.tables["near_duplicates"].loc[lambda t: t["flagged"], "path_b"])
    overlapping = set(result.tables["overlap"].loc[lambda t: t["flagged"], "identity"]) if drop_overlap else set()
    names = np.array(train.names, dtype=object)
    return [
        path for path, code in zip(train.paths, train.identity)
        if path not in drop and (code < 0 or names[code] not in overlapping)
    ]
