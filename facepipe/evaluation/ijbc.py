"""IJB-C / IJB-B 1:1 template verification, insightface ``ijb_11`` protocol, at full scale.

Protocol (REFERENCE.md, insightface/IJB-C), pinned to the ``ijb_11.py`` conventions:

* every image is aligned from its five points (or re-detected) and embedded with the flip test; the cache keeps
  the raw ``[orig, flip]`` embeddings (2 x D per image, ``facepipe.evaluation.ijbc_features``), so the switches
  below are re-evaluated in seconds;
* ``F`` flip: image feature = orig + flip (F1) or orig only (F0);
* ``N`` norm: ``use_norm_score=True`` (N1) keeps the raw feature, its norm acting as a quality weight;
  N0 L2-normalises each image feature. (``ijb_evals.py`` uses the opposite meaning; we follow ``ijb_11.py``.)
* ``D`` detector score: D1 multiplies each image feature by its face score;
* template = mean of the images within each media, summed over the template's media, L2-normalised;
* pair score = dot product of the two templates; ROC = ``sklearn.metrics.roc_curve(drop_intermediate=True)``,
  flipped; TAR at FAR = 1e-6 .. 1e-1 taken at the point nearest in FPR (ties: the higher TPR)
  (``facepipe.evaluation.metrics``).

Scale: pooling is one sparse matrix product per feature shard and pair scoring one BLAS product per block of
first templates, so the full IJB-C (469,375 images, 15.7 M pairs) runs in seconds from the cache.

Reports accumulate: ``write_report`` keeps every method's results in ``<output>/results.json`` (keyed by the row
name: method, detector, configuration code), so a second evaluation with another method adds its rows to
``table.md``, its curves to ``roc.png`` and its entries to ``tar_far.json``; evaluating a method again replaces
its own rows. The latest evaluation's rows come first.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.sparse
from tqdm import tqdm

from facepipe.embedding.base import l2_normalize
from facepipe.evaluation.ijbc_features import FLAG_DETECTOR_FALLBACK, FLAG_FAILED, FLAG_UNREADABLE, FeatureCache
from facepipe.evaluation.ijbc_layout import IJBLayout
from facepipe.evaluation.metrics import plot_roc, roc_curve, tar_at_far, tar_table
from facepipe.io.atomic import atomic_path, atomic_write_text


# ------------------------------------------------------------------------------------ switch configs
@dataclass(frozen=True)
class ScoreConfig:
    """The three ``ijb_11`` switches."""

    norm_score: bool = True  # N1: keep raw norm as quality (no per-image L2)
    detector_score: bool = True  # D1: multiply by face score
    flip: bool = True  # F1: add the mirror's embedding

    @property
    def code(self) -> str:
        return f"N{int(self.norm_score)}D{int(self.detector_score)}F{int(self.flip)}"

    @classmethod
    def parse(cls, code: str) -> "ScoreConfig":
        text = code.strip().upper()
        if len(text) != 6 or text[0::2] != "NDF" or any(c not in "01" for c in text[1::2]):
            raise ValueError(f"bad configuration {code!r}: expected e.g. N1D1F1 (N norm score, D detector score, F flip)")
        return cls(norm_score=text[1] == "1", detector_score=text[3] == "1", flip=text[5] == "1")


def parse_configs(text: str) -> list[ScoreConfig]:
    """``"N1D1F1,N0D0F1"`` or ``"all"`` (the reference's 8-row table)."""
    if text.strip().lower() == "all":
        return [ScoreConfig(n, d, f) for n in (True, False) for d in (True, False) for f in (True, False)]
    configs = [ScoreConfig.parse(part) for part in text.split(",") if part.strip()]
    if not configs:
        raise ValueError("no configuration given")
    return list(dict.fromkeys(configs))


def image_inputs(features: np.ndarray, scores: np.ndarray, config: ScoreConfig) -> np.ndarray:
    """Per-image inputs to pooling from cached ``(n, 2, D)`` [orig, flip] features, float32 like the reference."""
    x = features[:, 0] + features[:, 1] if config.flip else np.array(features[:, 0])
    x = x.astype(np.float32, copy=False)
    if not config.norm_score:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = x / np.where(norms > 0, norms, 1)  # unreadable images stay zero
    if config.detector_score:
        x = x * scores.astype(np.float32)[:, None]
    return x


# ------------------------------------------------------------------------------------------ pooling
@dataclass(frozen=True)
class TemplatePooling:
    """Sparse weights W (templates x images): template = W @ image features (mean in media, sum over media)."""

    unique_templates: np.ndarray  # (T,) sorted template ids
    template_index: np.ndarray  # (N,) row of each image's template
    image_weight: np.ndarray  # (N,) float64 = 1 / images in the same (template, media)

    @classmethod
    def build(cls, templates: np.ndarray, medias: np.ndarray) -> "TemplatePooling":
        unique_templates, template_index = np.unique(templates, return_inverse=True)
        _, media_group, media_count = np.unique(
            np.stack([template_index, np.asarray(medias)], axis=1), axis=0, return_inverse=True, return_counts=True
        )
        weight = 1.0 / media_count[media_group.reshape(-1)]
        return cls(unique_templates, template_index.reshape(-1), weight)

    @property
    def num_templates(self) -> int:
        return len(self.unique_templates)

    def accumulate(self, out: np.ndarray, start: int, inputs: np.ndarray) -> None:
        """Add the weighted images ``start .. start+len(inputs)`` into ``out`` (T, D) float64."""
        stop = start + len(inputs)
        rows, local = np.unique(self.template_index[start:stop], return_inverse=True)
        weights = scipy.sparse.csr_matrix(
            (self.image_weight[start:stop], (local.reshape(-1), np.arange(len(inputs)))), shape=(len(rows), len(inputs))
        )
        out[rows] += weights @ inputs

    def template_rows(self, template_ids: np.ndarray) -> np.ndarray:
        rows = np.searchsorted(self.unique_templates, template_ids)
        rows = np.minimum(rows, len(self.unique_templates) - 1)
        if not np.array_equal(self.unique_templates[rows], template_ids):
            raise ValueError("pairs name templates that have no images")
        return rows.astype(np.int32)


def pool_templates(
    pooling: TemplatePooling,
    shards: Iterable[tuple[Any, ...]],
    configs: Sequence[ScoreConfig],
) -> dict[ScoreConfig, np.ndarray]:
    """Stream ``(start, features (n,2,D), scores (n,)[, flags])`` shards once (``FeatureCache.iter_shards`` as it
    is); return L2-normalised (T, D) float64 per config."""
    sums: dict[ScoreConfig, np.ndarray] = {}
    for start, features, scores, *_ in shards:
        for config in configs:
            if config not in sums:
                sums[config] = np.zeros((pooling.num_templates, features.shape[-1]), dtype=np.float64)
            pooling.accumulate(sums[config], start, image_inputs(features, scores, config))
    if not sums:
        raise ValueError("no features to pool")
    return {config: l2_normalize(total, axis=1) for config, total in sums.items()}


# ------------------------------------------------------------------------------------------ scoring
def score_pairs(
    template_feats: np.ndarray, rows1: np.ndarray, rows2: np.ndarray, block: int = 1024, gather_chunk: int = 65536
) -> np.ndarray:
    """Dot products ``template_feats[rows1[k]] . template_feats[rows2[k]]`` for all pairs, streamed.

    Pairs are grouped by blocks of ``block`` first templates; each block is one matrix product against the
    second templates it meets (BLAS), from which its pairs' scores are picked. Sparse blocks fall back to
    gathering rows ``gather_chunk`` pairs at a time. Memory stays at one (block x templates) matrix.
    """
    num_templates = len(template_feats)
    scores = np.empty(len(rows1), dtype=template_feats.dtype)
    block_of_pair = (rows1 // block).astype(np.int16 if num_templates // block < 2**15 else np.int64)
    order = np.argsort(block_of_pair, kind="stable")  # radix sort for int16
    bounds = np.searchsorted(block_of_pair[order], np.arange(0, (num_templates + block - 1) // block + 1))
    column_of = np.empty(num_templates, dtype=np.int64)
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        if lo == hi:
            continue
        pairs = order[lo:hi]
        first, second = rows1[pairs], rows2[pairs]
        seen = np.zeros(num_templates, dtype=bool)
        seen[second] = True
        columns = np.flatnonzero(seen)
        first_lo = b * block
        first_rows = template_feats[first_lo : first_lo + block]
        # Measured: a gathered pair costs ~40x a cell of the product, so gather only very sparse blocks.
        if len(pairs) * 32 < len(first_rows) * len(columns):
            for s in range(0, len(pairs), gather_chunk):
                chunk = slice(s, s + gather_chunk)
                scores[pairs[chunk]] = np.einsum("ij,ij->i", template_feats[first[chunk]], template_feats[second[chunk]])
            continue
        column_of[columns] = np.arange(len(columns))
        similarity = first_rows @ template_feats[columns].T
        scores[pairs] = similarity[first - first_lo, column_of[second]]
    return scores



# ------------------------------------------------------------------------------------- evaluation
@dataclass
class ConfigResult:
    name: str  # the table row: "<method>[+<detector>] <code>"; the key of the results store
    config: dict[str, Any]
    tar_at_far: dict[str, float]
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"TAR@FAR": self.tar_at_far, "config": self.config}


def evaluate_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(labels, scores)
    return tar_at_far(fpr, tpr), fpr, tpr


def evaluate_cache(
    layout: IJBLayout,
    cache: FeatureCache,
    configs: Sequence[ScoreConfig],
    method: str,
    scores_dir: str | os.PathLike | None = None,
    pooling: TemplatePooling | None = None,
    extra_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[ConfigResult]:
    """Pool, score and evaluate every configuration from one pass over the cache."""
    pooling = pooling or TemplatePooling.build(layout.templates, layout.medias)
    shards = tqdm(cache.iter_shards(), total=cache.num_shards, desc="pooling", unit="shard", disable=not progress)
    template_feats = pool_templates(pooling, shards, configs)
    rows1 = pooling.template_rows(layout.pair_t1)
    rows2 = pooling.template_rows(layout.pair_t2)
    flags = cache.flags()
    counts = {
        "images": int(layout.num_images),
        "templates": int(pooling.num_templates),
        "pairs": int(len(layout.labels)),
        "genuine_pairs": int(layout.labels.sum()),
        "detector_fallbacks": int((flags == FLAG_DETECTOR_FALLBACK).sum()),
        "unreadable_images": int((flags == FLAG_UNREADABLE).sum()),
        "failed_images": int((flags == FLAG_FAILED).sum()),
    }
    results = []
    for config in configs:
        scores = score_pairs(template_feats[config], rows1, rows2)
        name = f"{method} {config.code}"
        if scores_dir is not None:
            with atomic_path(Path(scores_dir) / f"{_file_safe(name)}.npy") as tmp:
                np.save(tmp, scores)
        tars, fpr, tpr = evaluate_scores(layout.labels, scores)
        described = {
            "method": method,
            "code": config.code,
            **asdict(config),
            "target": layout.target,
            "cache": str(cache.directory),
            **cache.key,
            **counts,
            **(extra_config or {}),
        }
        results.append(ConfigResult(name, described, tars, fpr, tpr))
        del scores
    return results


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------------------------------- reports
STORE = "results.json"


class ReportError(ValueError):
    """The output folder holds results that cannot be merged with these (another target, a damaged store)."""


def _load_store(output_dir: Path) -> list[ConfigResult]:
    path = output_dir / STORE
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
        loaded = []
        for entry in entries:
            with np.load(output_dir / entry["curve"]) as curve:
                loaded.append(ConfigResult(entry["name"], entry["config"], entry["TAR@FAR"], curve["fpr"], curve["tpr"]))
        return loaded
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ReportError(f"{path} is damaged ({error}); remove it (and curves/) to start the table afresh") from None


def write_report(results: Sequence[ConfigResult], output_dir: str | os.PathLike, title: str = "ROC on IJB") -> dict[str, Path]:
    """Merge ``results`` into the folder's results store (they come first; a stored row with the same name is
    replaced, the others follow in their order), then rewrite ``tar_far.json`` (list of {"TAR@FAR", "config"}), ``<name>.json`` each, ``table.md``
    and ``roc.png`` from every stored result. Every file is written atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stored = _load_store(output_dir)
    targets = {r.config.get("target") for r in [*stored, *results]} - {None}
    if len(targets) > 1:
        raise ReportError(f"{output_dir} holds results of {', '.join(sorted(targets))}; use one output folder per target")
    # The latest evaluation leads: its rows first (in their order), then the stored rows it does not replace.
    latest = {r.name: r for r in results}
    rows = [*latest.values(), *(r for r in stored if r.name not in latest)]
    entries = []
    for result in results:
        with atomic_path(output_dir / "curves" / f"{_file_safe(result.name)}.npz") as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, fpr=result.fpr, tpr=result.tpr)
        atomic_write_text(output_dir / f"{_file_safe(result.name)}.json", json.dumps(result.to_json(), indent=1))
    for result in rows:
        entries.append({"name": result.name, "curve": f"curves/{_file_safe(result.name)}.npz", **result.to_json()})
    paths = {"json": output_dir / "tar_far.json", "table": output_dir / "table.md", "roc": output_dir / "roc.png"}
    atomic_write_text(paths["json"], json.dumps([r.to_json() for r in rows], indent=1))
    atomic_write_text(paths["table"], tar_table([(r.name, r.tar_at_far) for r in rows]) + "\n")
    plot_roc([(r.name, r.fpr, r.tpr) for r in rows], paths["roc"], title, log_far=True)
    atomic_write_text(output_dir / STORE, json.dumps({"entries": entries}, indent=1))
    return paths
