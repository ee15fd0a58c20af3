"""IJB-C / IJB-B 1:N open-set identification on the templates of the 1:1 protocol (NIST FRVT definitions).

Protocol:

* galleries and probes: ``meta/ijbc_1N_gallery_G1.csv`` / ``_G2.csv`` (IJB-B: ``ijbb_1N_gallery_S1.csv`` /
  ``_S2.csv``) and ``{ijbc,ijbb}_1N_probe_mixed.csv``; a header line, then one line per image: ``TEMPLATE_ID,
  SUBJECT_ID, FILENAME, ...``. A template's subject is the one on its lines (two subjects for one template are an
  error naming the line). Template features are those of the 1:1 protocol (``facepipe.evaluation.ijbc``: the same
  feature cache, media pooling and N/D/F switches), L2-normalised; score = dot product.
* every probe template is searched in each gallery separately. A search is **mated** when the probe's subject has
  a template in the gallery (the G1 and G2 subjects are disjoint, so each IJB-C probe is mated in one gallery and
  non-mated in the other), **non-mated** otherwise.
* **CMC** (rank 1, 5, 10, 20), over the mated searches: the mate's rank is 1 + the number of non-mate gallery
  templates scoring at least as high as the best-scoring template of the probe's subject (ties count against
  the mate: a rank is never flattered by a tie).
* **TPIR at FPIR** (0.01, 0.1), NIST FRVT (NISTIR 8271): ``FPIR(T)`` = fraction of non-mated searches whose best
  gallery score is ``>= T``; the threshold for level ``f`` is the lowest ``T`` with ``FPIR(T) <= f``, i.e. just
  above the ``(floor(f N) + 1)``-th highest non-mated best score; ``TPIR(T)`` = fraction of mated searches whose
  mate is at rank 1 and scores ``>= T`` (``1 - FNIR(R=1, T)``).
* figures per gallery, and the mean of the two galleries.

Where insightface's ``ijb_evals.py:evaluation_1N`` (after PR #1387 / #1739) differs, and which this follows:

1. threshold: insightface takes ``T = sorted_desc[max(int(N f) - 1, 0)]`` and counts a mate only when it scores
   ``> T``, which allows ``floor(N f) - 1`` false alarms where NIST allows ``floor(N f)`` (both allow none when
   ``N f < 1``). We follow NIST; the two differ only by one non-mated search at each level (``tpir_insightface``
   states insightface's rule, for comparison).
2. mean CMC: insightface divides the summed rank-k counts of both galleries by the number of probes; we report the
   mean of the two galleries' rates (the figures coincide when the galleries have equally many mated searches).
   TPIR: both average the two galleries.
3. a subject with several templates in a gallery: insightface ranks its first template; we rank its best one
   (IJB-C and IJB-B galleries hold one template per subject, so the figures agree there).
4. insightface reports rank 1, 5 and 10 only; we add rank 20.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from facepipe.evaluation.ijbc import ReportError, ScoreConfig, TemplatePooling, pool_templates
from facepipe.evaluation.ijbc_features import FeatureCache
from facepipe.evaluation.ijbc_layout import IJBLayout, IJBMetaError
from facepipe.evaluation.metrics import markdown_table
from facepipe.io.atomic import atomic_write_text

GALLERY_FILES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
RANKS: tuple[int, ...] = (1, 5, 10, 20)
FPIR_LEVELS: tuple[float, ...] = (0.01, 0.1)


# ------------------------------------------------------------------------------------------ meta files
@dataclass(frozen=True)
class TemplateSet:
    """The templates of one gallery or of the probe set, with their subjects."""

    name: str
    templates: np.ndarray  # (T,) template ids, in the file's order of first appearance
    subjects: np.ndarray  # (T,) subject id of each template


def protocol_paths(root: str | os.PathLike, target: str) -> dict[str, Path]:
    if target not in GALLERY_FILES:
        raise IJBMetaError(f"unknown target {target!r}; choose from {', '.join(GALLERY_FILES)}")
    meta = Path(root) / "meta"
    prefix = target.lower()
    paths = {name: meta / f"{prefix}_1N_gallery_{name}.csv" for name in GALLERY_FILES[target]}
    paths["probe"] = meta / f"{prefix}_1N_probe_mixed.csv"
    return paths


def read_template_set(path: Path, name: str, known_templates: np.ndarray) -> TemplateSet:
    """``TEMPLATE_ID,SUBJECT_ID,...`` lines after a header; every template must have images in the 1:1 layout."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB 1:N meta file not found: {path}")
    try:
        table = pd.read_csv(path, sep=",", header=0, usecols=[0, 1], dtype=np.int64, engine="c")
    except (ValueError, pd.errors.ParserError) as error:
        raise IJBMetaError(f"{path}: expected a header, then TEMPLATE_ID,SUBJECT_ID,... integer columns ({error})") from None
    if table.empty:
        raise IJBMetaError(f"{path}: no templates")
    templates, subjects = table.iloc[:, 0].to_numpy(), table.iloc[:, 1].to_numpy()
    unique, first = np.unique(templates, return_index=True)
    order = np.sort(first)
    conflicting = subjects != subjects[first[np.searchsorted(unique, templates)]]
    if conflicting.any():
        line = int(np.flatnonzero(conflicting)[0])
        raise IJBMetaError(f"{path} line {line + 2}: template {templates[line]} already has another subject")
    unknown = ~np.isin(templates, known_templates)
    if unknown.any():
        line = int(np.flatnonzero(unknown)[0])
        raise IJBMetaError(f"{path} line {line + 2}: template {templates[line]} has no images in the face list")
    return TemplateSet(name, templates[order], subjects[order])


def read_1n_protocol(root: str | os.PathLike, target: str, layout: IJBLayout) -> tuple[list[TemplateSet], TemplateSet]:
    """(galleries, probes) of ``<root>/meta``."""
    paths = protocol_paths(root, target)
    known = np.unique(layout.templates)
    galleries = [read_template_set(paths[name], name, known) for name in GALLERY_FILES[target]]
    return galleries, read_template_set(paths["probe"], "probe", known)


# ------------------------------------------------------------------------------------------ searches
@dataclass(frozen=True)
class Searches:
    """Per probe: whether it is mated, its mate's rank and score (mated), its best gallery score (non-mated)."""

    mated: np.ndarray  # (P,) bool
    rank: np.ndarray  # (P,) int, 0 for non-mated searches
    mate_score: np.ndarray  # (P,) float, -inf for non-mated searches
    best_score: np.ndarray  # (P,) float, the top gallery score of every search


def search(
    probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray, gallery_subjects: np.ndarray, block: int = 4096
) -> Searches:
    """Every probe against the whole gallery (dot products, ``block`` probes at a time)."""
    n = len(probe_feats)
    mated = np.isin(probe_subjects, gallery_subjects)
    rank = np.zeros(n, dtype=np.int64)
    mate_score = np.full(n, -np.inf)
    best_score = np.empty(n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        similarity = probe_feats[start:stop] @ gallery_feats.T
        is_mate = probe_subjects[start:stop, None] == gallery_subjects[None, :]
        mate = np.where(is_mate, similarity, -np.inf).max(axis=1)
        beats = (similarity >= mate[:, None]) & ~is_mate
        rank[start:stop] = np.where(mated[start:stop], 1 + beats.sum(axis=1), 0)
        mate_score[start:stop] = mate
        best_score[start:stop] = similarity.max(axis=1)
    return Searches(mated, rank, mate_score, best_score)


def cmc(searches: Searches, ranks: Sequence[int] = RANKS) -> dict[str, float]:
    """Fraction of mated searches whose mate is within rank R."""
    mated_ranks = searches.rank[searches.mated]
    return {f"rank{r}": float(np.mean(mated_ranks <= r)) if len(mated_ranks) else float("nan") for r in ranks}


def fpir_threshold(non_mated_best: np.ndarray, fpir: float) -> float:
    """The lowest threshold T with FPIR(T) = mean(non_mated_best >= T) <= fpir (NIST)."""
    allowed = int(np.floor(fpir * len(non_mated_best) + 1e-9))
    if allowed >= len(non_mated_best):
        return -np.inf
    ranked = np.sort(non_mated_best)[::-1]
    return float(np.nextafter(ranked[allowed], np.inf))


def tpir_at_fpir(searches: Searches, levels: Sequence[float] = FPIR_LEVELS) -> tuple[dict[str, float], dict[str, float]]:
    """({level: TPIR}, {level: threshold}): mate at rank 1 and scoring at least the level's threshold."""
    non_mated = searches.best_score[~searches.mated]
    hits_rank1 = searches.rank[searches.mated] == 1
    scores = searches.mate_score[searches.mated]
    tpirs, thresholds = {}, {}
    for level in levels:
        key = repr(float(level))
        if not len(non_mated) or not len(scores):
            tpirs[key], thresholds[key] = float("nan"), float("nan")
            continue
        threshold = fpir_threshold(non_mated, level)
        tpirs[key] = float(np.mean(hits_rank1 & (scores >= threshold)))
        thresholds[key] = threshold
    return tpirs, thresholds


def tpir_insightface(searches: Searches, level: float) -> float:
    """insightface ``evaluation_1N``'s TPIR at one level (see the module docstring, difference 1)."""
    non_mated = np.sort(searches.best_score[~searches.mated])[::-1]
    threshold = non_mated[max(int(len(non_mated) * level) - 1, 0)]
    scores = searches.mate_score[searches.mated]
    return float(np.mean((searches.rank[searches.mated] == 1) & (scores > threshold)))


# ------------------------------------------------------------------------------------------ evaluation
@dataclass
class IdentificationResult:
    name: str  # "<method> <code> <gallery>" (gallery "mean" for the average of the galleries)
    gallery: str
    cmc: dict[str, float]
    tpir: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "gallery": self.gallery, "CMC": self.cmc, "TPIR@FPIR": self.tpir, "thresholds": self.thresholds, "config": self.config}


def evaluate_identification(
    template_feats: np.ndarray, pooling: TemplatePooling, galleries: Sequence[TemplateSet], probes: TemplateSet, name: str,
    config: dict[str, Any] | None = None,
) -> list[IdentificationResult]:
    """Search the probes in each gallery; one result per gallery, then their mean."""
    probe_feats = template_feats[pooling.template_rows(probes.templates)]
    results = []
    for gallery in galleries:
        searches = search(probe_feats, probes.subjects, template_feats[pooling.template_rows(gallery.templates)], gallery.subjects)
        tpirs, thresholds = tpir_at_fpir(searches)
        counts = {"mated_searches": int(searches.mated.sum()), "non_mated_searches": int((~searches.mated).sum()), "gallery_templates": len(gallery.templates)}
        results.append(IdentificationResult(f"{name} {gallery.name}", gallery.name, cmc(searches), tpirs, {**(config or {}), **counts}, thresholds))
    mean_cmc = {k: float(np.mean([r.cmc[k] for r in results])) for k in results[0].cmc}
    mean_tpir = {k: float(np.mean([r.tpir[k] for r in results])) for k in results[0].tpir}
    results.append(IdentificationResult(f"{name} mean", "mean", mean_cmc, mean_tpir, dict(config or {})))
    return results


def evaluate_cache_1n(
    layout: IJBLayout, cache: FeatureCache, configs: Sequence[ScoreConfig], method: str, galleries: Sequence[TemplateSet],
    probes: TemplateSet, pooling: TemplatePooling | None = None, extra_config: dict[str, Any] | None = None,
) -> list[IdentificationResult]:
    """Pool the cache's features once per configuration (as the 1:1 protocol) and run the searches."""
    pooling = pooling or TemplatePooling.build(layout.templates, layout.medias)
    template_feats = pool_templates(pooling, cache.iter_shards(), configs)
    results = []
    for config in configs:
        described = {"method": method, "code": config.code, "target": layout.target, **cache.key, **(extra_config or {})}
        results += evaluate_identification(template_feats[config], pooling, galleries, probes, f"{method} {config.code}", described)
    return results


# ------------------------------------------------------------------------------------------ reports
STORE_1N = "identification.json"


def identification_table(results: Sequence[IdentificationResult]) -> str:
    """``Methods | rank1 .. rank20 | TPIR@FPIR=0.01 | 0.1`` in %, two decimals."""
    cmc_keys = [f"rank{r}" for r in RANKS]
    tpir_keys = [repr(float(x)) for x in FPIR_LEVELS]
    header = ["Methods", *(f"rank-{r}" for r in RANKS), *(f"TPIR@FPIR={k}" for k in tpir_keys)]
    rows = [[r.name, *(f"{r.cmc[k] * 100:.2f}" for k in cmc_keys), *(f"{r.tpir[k] * 100:.2f}" for k in tpir_keys)] for r in results]
    return markdown_table(header, rows)


def write_identification_report(results: Sequence[IdentificationResult], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Accumulate in ``identification.json`` (the latest results first, a rerun of a row replaces it), then
    rewrite ``identification.md``; atomic writes."""
    output_dir = Path(output_dir)
    paths = {"json": output_dir / STORE_1N, "table": output_dir / "identification.md"}
    stored: list[dict[str, Any]] = []
    if paths["json"].is_file():
        try:
            stored = list(json.loads(paths["json"].read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            raise ReportError(f"{paths['json']} is damaged ({error}); remove it to start the table afresh") from None
    latest = [r.to_json() for r in results]
    targets = {e.get("config", {}).get("target") for e in [*stored, *latest]} - {None}
    if len(targets) > 1:
        raise ReportError(f"{output_dir} holds 1:N results of {', '.join(sorted(targets))}; use one output folder per target")
    names = {entry["name"] for entry in latest}
    entries = [*latest, *(e for e in stored if e.get("name") not in names)]
    atomic_write_text(paths["json"], json.dumps(entries, indent=1))
    rows = [IdentificationResult(e["name"], e["gallery"], e["CMC"], e["TPIR@FPIR"]) for e in entries]
    atomic_write_text(paths["table"], identification_table(rows) + "\n")
    return paths
