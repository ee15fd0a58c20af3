"""IJB-C / IJB-B 1:1 template verification, insightface ``ijb_11`` protocol, at full scale.

Protocol (REFERENCE.md, insightface/IJB-C), pinned to the ``ijb_11.py`` conventions:

* every image is aligned from its five points (or re-detected) and embedded with the flip test; the cache keeps
  the raw ``[orig, flip]`` embeddings (2 x D per image), so the switches below are re-evaluated in seconds;
* ``F`` flip: image feature = orig + flip (F1) or orig only (F0);
* ``N`` norm: ``use_norm_score=True`` (N1) keeps the raw feature, its norm acting as a quality weight;
  N0 L2-normalises each image feature. (``ijb_evals.py`` uses the opposite meaning; we follow ``ijb_11.py``.)
* ``D`` detector score: D1 multiplies each image feature by its face score;
* template = mean of the images within each media, summed over the template's media, L2-normalised;
* pair score = dot product of the two templates; ROC = ``sklearn.metrics.roc_curve(drop_intermediate=True)``,
  flipped; TAR at FAR = 1e-6 .. 1e-1 taken at the point nearest in FPR (ties: the higher TPR).

Scale: pooling is one sparse matrix product per feature shard and pair scoring one BLAS product per block of
first templates, so the full IJB-C (469,375 images, 15.7 M pairs) runs in seconds from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import pandas as pd
import scipy.sparse
from tqdm import tqdm

from facepipe.alignment import estimate_norm, warp_crops
from facepipe.io.atomic import atomic_path, atomic_write_text
from facepipe.io.images import ImageDecodeError, read_image

FAR_LEVELS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBC", "IJBB")
GIVEN_LANDMARKS = "given"  # "detector" name for the five points shipped with the data set

# Per-image flags stored in the cache.
FLAG_OK = 0
FLAG_DETECTOR_FALLBACK = 1  # re-detection found no matching face: aligned from the given points
FLAG_UNREADABLE = 2  # image could not be decoded: zero feature, contributes nothing to its template


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class IJBLayout:
    """The meta data of IJB-C / IJB-B: one row per face image, plus the template pairs."""

    root: Path
    target: str
    image_names: np.ndarray  # (N,) str, file names under loose_crop/
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id of each image
    landmarks: np.ndarray  # (N, 5, 2) float32 in loose-crop pixels
    faceness: np.ndarray  # (N,) float32 detector score shipped with the data
    pair_t1: np.ndarray  # (P,) template id
    pair_t2: np.ndarray  # (P,) template id
    labels: np.ndarray  # (P,) int8, 1 genuine / 0 impostor

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    def image_paths(self, start: int, stop: int) -> list[str]:
        return [str(self.image_dir / name) for name in self.image_names[start:stop]]


def meta_paths(root: str | os.PathLike, target: str = "IJBC") -> dict[str, Path]:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    meta = Path(root) / "meta"
    prefix = target.lower()
    return {
        "tid_mid": meta / f"{prefix}_face_tid_mid.txt",
        "landmarks": meta / f"{prefix}_name_5pts_score.txt",
        "pairs": meta / f"{prefix}_template_pair_label.txt",
    }


def _read_table(path: Path, dtypes: dict[int, Any]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    try:
        return pd.read_csv(path, sep=" ", header=None, dtype=dtypes, engine="c")
    except (ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"{path}: not in the expected space-separated format ({error})") from error


def read_template_media(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``img tid mid`` lines -> (image names, template ids, media ids)."""
    table = _read_table(path, {0: str, 1: np.int64, 2: np.int64})
    if table.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 columns (image template media), found {table.shape[1]}")
    return table[0].to_numpy(dtype=object), table[1].to_numpy(), table[2].to_numpy()


def read_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``img x1 y1 .. x5 y5 faceness`` lines -> (image names, (N,5,2) float32, (N,) float32)."""
    table = _read_table(path, {0: str, **{i: np.float32 for i in range(1, 12)}})
    if table.shape[1] != 12:
        raise ValueError(f"{path}: expected 12 columns (image, 10 coordinates, faceness), found {table.shape[1]}")
    landmarks = table.iloc[:, 1:11].to_numpy(dtype=np.float32).reshape(-1, 5, 2)
    return table[0].to_numpy(dtype=object), landmarks, table[11].to_numpy(dtype=np.float32)


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t1 t2 label`` lines -> (t1, t2, label int8)."""
    table = _read_table(path, {0: np.int64, 1: np.int64, 2: np.int8})
    if table.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 columns (template1 template2 label), found {table.shape[1]}")
    labels = table[2].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return table[0].to_numpy(), table[1].to_numpy(), labels


def read_ijb_layout(root: str | os.PathLike, target: str = "IJBC") -> IJBLayout:
    """Read ``<root>/meta/<target>_*.txt``; images are expected under ``<root>/loose_crop``."""
    paths = meta_paths(root, target)
    names, templates, medias = read_template_media(paths["tid_mid"])
    lmk_names, landmarks, faceness = read_landmarks(paths["landmarks"])
    # The reference zips the two files by line; make that assumption explicit.
    if len(names) != len(lmk_names) or not np.array_equal(names, lmk_names):
        raise ValueError(f"{paths['tid_mid'].name} and {paths['landmarks'].name} do not list the same images in the same order")
    t1, t2, labels = read_pairs(paths["pairs"])
    known = np.unique(templates)
    for column, ids in (("first", t1), ("second", t2)):
        missing = ~np.isin(ids, known)
        if missing.any():
            raise ValueError(f"{paths['pairs'].name}: {int(missing.sum())} pairs name a {column} template with no images, e.g. {ids[missing][0]}")
    return IJBLayout(Path(root), target, names, templates, medias, landmarks, faceness, t1, t2, labels)


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


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """Like sklearn.preprocessing.normalize: zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def pool_templates(
    pooling: TemplatePooling,
    shards: Iterable[tuple[int, np.ndarray, np.ndarray]],
    configs: Sequence[ScoreConfig],
) -> dict[ScoreConfig, np.ndarray]:
    """Stream ``(start, features (n,2,D), scores (n,))`` shards once; return L2-normalised (T, D) float64 per config."""
    sums: dict[ScoreConfig, np.ndarray] = {}
    for start, features, scores in shards:
        for config in configs:
            if config not in sums:
                sums[config] = np.zeros((pooling.num_templates, features.shape[-1]), dtype=np.float64)
            pooling.accumulate(sums[config], start, image_inputs(features, scores, config))
    if not sums:
        raise ValueError("no features to pool")
    return {config: l2_normalize_rows(total) for config, total in sums.items()}


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


# ---------------------------------------------------------------------------------------------- ROC
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


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far_levels: Sequence[float] = FAR_LEVELS) -> dict[str, float]:
    """The reference rule: flip the curve, take the point nearest in FPR (first of ties = highest TPR)."""
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    return {far_key(x): float(tpr[int(np.argmin(np.abs(fpr - x)))]) for x in far_levels}


def far_key(x: float) -> str:
    """Python's own spelling, as in the reference table headers: "1e-06", "1e-05", "0.0001", ..., "0.1"."""
    return repr(float(x))


def format_table(rows: Sequence[tuple[str, dict[str, float]]], far_levels: Sequence[float] = FAR_LEVELS) -> str:
    """Markdown table ``Methods | 1e-06 | ... | 0.1`` with TAR x 100, two decimals."""
    keys = [far_key(x) for x in far_levels]
    lines = ["| Methods | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for name, tars in rows:
        lines.append(f"| {name} | " + " | ".join(f"{tars[k] * 100:.2f}" for k in keys) + " |")
    return "\n".join(lines)


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike, title: str = "ROC on IJB") -> None:
    """One curve per configuration, log-x FAR 1e-6 .. 0.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5))
    for name, fpr, tpr in curves:
        axis.plot(fpr, tpr, lw=1.2, label=name)
    axis.set_xscale("log")
    axis.set_xlim(1e-6, 0.1)
    axis.set_ylim(0.0, 1.01)
    axis.set_xticks(list(FAR_LEVELS))
    axis.grid(True, which="major", linestyle="--", linewidth=0.5)
    axis.set_xlabel("False Positive Rate")
    axis.set_ylabel("True Positive Rate")
    axis.set_title(title)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)


# ------------------------------------------------------------------------------------ feature cache
class FeatureCache:
    """Sharded on-disk cache of [orig, flip] image embeddings, face scores and flags, in layout order.

    ``<dir>/manifest.json`` records the key (data set, model, detector) and geometry; shard ``k`` covers images
    ``k*shard_size ..`` in three files ``features_k.npy`` (n, 2, D) float32, ``scores_k.npy`` (n,) float32,
    ``flags_k.npy`` (n,) uint8. Shards are written to a temporary name and renamed, so an interrupted run
    resumes at the first missing shard and never reads a half-written one.
    """

    def __init__(self, directory: str | os.PathLike, key: dict[str, Any], num_images: int, shard_size: int = 4096) -> None:
        self.directory = Path(directory)
        self.key = key
        self.num_images = int(num_images)
        self.shard_size = int(shard_size)
        manifest = self.directory / "manifest.json"
        if manifest.is_file():
            stored = json.loads(manifest.read_text())
            if stored["key"] != key or stored["num_images"] != num_images:
                raise ValueError(f"feature cache {self.directory} was made for {stored['key']} ({stored['num_images']} images), not {key}")
            self.shard_size = int(stored["shard_size"])
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(manifest, json.dumps({"key": key, "num_images": num_images, "shard_size": self.shard_size}, indent=1))

    @staticmethod
    def key_digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def num_shards(self) -> int:
        return (self.num_images + self.shard_size - 1) // self.shard_size

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def _paths(self, index: int) -> tuple[Path, Path, Path]:
        return tuple(self.directory / f"{kind}_{index:06d}.npy" for kind in ("features", "scores", "flags"))  # type: ignore[return-value]

    def has_shard(self, index: int) -> bool:
        return all(p.is_file() for p in self._paths(index))

    def missing_shards(self) -> list[int]:
        return [k for k in range(self.num_shards) if not self.has_shard(k)]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def write_shard(self, index: int, features: np.ndarray, scores: np.ndarray, flags: np.ndarray) -> None:
        start, stop = self.shard_range(index)
        n = stop - start
        if features.shape[:2] != (n, 2) or scores.shape != (n,) or flags.shape != (n,):
            raise ValueError(f"shard {index} must hold {n} images: features (n,2,D), scores (n,), flags (n,)")
        # has_shard() needs all three files, each renamed into place only when fully written.
        for path, array in zip(self._paths(index)[::-1], (flags.astype(np.uint8), scores.astype(np.float32), features.astype(np.float32))):
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, path)

    def read_shard(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features, scores, flags = (np.load(p) for p in self._paths(index))
        start, stop = self.shard_range(index)
        if len(features) != stop - start or len(scores) != stop - start or len(flags) != stop - start:
            raise ValueError(f"feature cache shard {index} in {self.directory} is corrupt; delete it to re-extract")
        return features, scores, flags

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        missing = self.missing_shards()
        if missing:
            raise ValueError(f"feature cache {self.directory} is incomplete: {len(missing)} of {self.num_shards} shards missing")
        for k in range(self.num_shards):
            features, scores, flags = self.read_shard(k)
            yield self.shard_range(k)[0], features, scores, flags

    def flags(self) -> np.ndarray:
        return np.concatenate([np.load(self._paths(k)[2]) for k in range(self.num_shards)])


# ------------------------------------------------------------------------------- feature extraction
def match_detection(faces: Sequence[Any], given: np.ndarray, max_distance: float = 0.5) -> Any | None:
    """The detected face whose five points are nearest the given ones (mean distance relative to the given
    points' extent), or None when even the nearest is further than ``max_distance`` (another face)."""
    if not faces:
        return None
    scale = max(float(np.ptp(given[:, 0])), float(np.ptp(given[:, 1])), 1.0)
    distances = [float(np.linalg.norm(face.landmarks - given, axis=1).mean()) / scale for face in faces]
    best = int(np.argmin(distances))
    return faces[best] if distances[best] <= max_distance else None


def extract_batch(
    paths: Sequence[str],
    landmarks: np.ndarray,
    faceness: np.ndarray,
    embedder: Any,
    detector: Any | None = None,
    crop_size: int = 112,
    detector_pad: float = 0.2,
) -> dict[str, np.ndarray]:
    """Features for one batch of loose crops: ``{"features": (n,2,D), "score": (n,), "flag": (n,)}``.

    Aligns from the given points, or from the matching face of ``detector`` (its score replaces the given
    faceness; no match -> given points, flagged). Unreadable images get zero features and a flag.
    Before detection each loose crop gets a black border of ``detector_pad`` x its longer side: faces that fill
    the crop otherwise get boxes beyond the image, and MTCNN then misplaces the landmarks (measured on CFP:
    median landmark error 18% of the face size without the border, 5% with 0.2).
    """
    n = len(paths)
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(n, 5, 2).copy()
    scores = np.asarray(faceness, dtype=np.float32).copy()
    flags = np.zeros(n, dtype=np.uint8)
    images: list[np.ndarray | None] = []
    for i, path in enumerate(paths):
        try:
            images.append(read_image(path))
        except (ImageDecodeError, OSError) as error:
            warnings.warn(f"IJB image {path} unreadable ({error}); it gets a zero feature")
            images.append(None)
            flags[i] = FLAG_UNREADABLE
    readable = [i for i, image in enumerate(images) if image is not None]
    if detector is not None and readable:
        borders = [int(round(detector_pad * max(images[i].shape[:2]))) for i in readable]
        padded = [cv2.copyMakeBorder(images[i], b, b, b, b, cv2.BORDER_CONSTANT, value=0) for i, b in zip(readable, borders)]
        detections = detector.detect(padded)
        for i, border, faces in zip(readable, borders, detections):
            faces = [face.translated(-border, -border) for face in faces]
            face = match_detection(faces, landmarks[i])
            if face is None:
                flags[i] = FLAG_DETECTOR_FALLBACK
            else:
                landmarks[i] = face.landmarks
                scores[i] = face.score
    embedding_size = int(embedder.embedding_size)
    features = np.zeros((n, 2, embedding_size), dtype=np.float32)
    if readable:
        matrices = estimate_norm(landmarks[readable], crop_size)
        crops = np.concatenate([warp_crops(images[i], m[None], crop_size) for i, m in zip(readable, matrices)])
        both = embedder.embed(np.concatenate([crops, crops[:, :, ::-1]]), flip=False)
        features[readable, 0] = both[: len(readable)]
        features[readable, 1] = both[len(readable) :]
    return {"features": features, "score": scores, "flag": flags}


@dataclass
class FeatureExtractor:
    """Picklable batch function (models are built lazily in the process that runs it, e.g. a Ray actor).

    ``extractor({"path": (n,) str, "landmarks": (n,5,2), "faceness": (n,)})`` -> the batch plus ``features``,
    ``score``, ``flag`` (see :func:`extract_batch`).
    """

    model: str = "mobilefacenet"
    weights: str | None = None
    detector: str | None = None  # None: align from the given points
    detector_weights: str | None = None
    device: str = "cpu"
    crop_size: int = 112
    detector_pad: float = 0.2  # black border, fraction of the longer side, around each crop before detection
    _models: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def models(self) -> tuple[Any, Any]:
        if self._models is None:
            from facepipe.embedding.base import create_embedder

            embedder = create_embedder(self.model, weights=self.weights, device=self.device)
            detector = None
            if self.detector is not None:
                from facepipe.detection.base import create_detector

                detector = create_detector(self.detector, weights=self.detector_weights, device=self.device)
            self._models = (embedder, detector)
        return self._models

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_models"] = None
        return state

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedder, detector = self.models()
        out = extract_batch(list(batch["path"]), batch["landmarks"], batch["faceness"], embedder, detector, self.crop_size, self.detector_pad)
        return {**batch, **out}

    def embedding_size(self) -> int:
        return int(self.models()[0].embedding_size)

    def cache_key(self, layout: IJBLayout) -> dict[str, Any]:
        weights = None
        if self.weights is not None:
            stat = Path(self.weights).stat()
            weights = {"path": str(Path(self.weights).resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime)}
        return {
            "dataset": str(layout.root.resolve()),
            "target": layout.target,
            "num_images": layout.num_images,
            "model": self.model,
            "weights": weights,
            "detector": self.detector or GIVEN_LANDMARKS,
            "detector_weights": self.detector_weights,
            "crop_size": self.crop_size,
            "detector_pad": self.detector_pad if self.detector else None,
        }


def local_engine(extractor: Callable[[dict], dict], batches: Iterable[dict]) -> Iterator[dict]:
    """Run batches in this process, in order (other engines must also yield in order)."""
    for batch in batches:
        yield extractor(batch)


ENGINES: dict[str, Callable[[Callable[[dict], dict], Iterable[dict]], Iterator[dict]]] = {"local": local_engine}


def extract_features(
    layout: IJBLayout,
    cache: FeatureCache,
    extractor: Callable[[dict], dict],
    batch_size: int = 64,
    engine: str = "local",
    progress: bool = True,
    engine_options: Any = None,
) -> FeatureCache:
    """Fill the missing shards of ``cache``; resumable, one progress bar over all images."""
    if engine == "ray":  # one Ray Data job over all missing shards; ``engine_options``: facepipe.engine RayOptions
        from facepipe.engine.ray_engine import extract_ijb_features_ray

        return extract_ijb_features_ray(layout, cache, extractor, batch_size=batch_size, options=engine_options, progress=progress)
    try:
        run = ENGINES[engine]
    except KeyError:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}") from None
    missing = cache.missing_shards()
    done = cache.num_images - sum(cache.shard_range(k)[1] - cache.shard_range(k)[0] for k in missing)
    with tqdm(total=cache.num_images, initial=done, unit="img", desc=f"{layout.target} features", disable=not progress) as bar:
        for shard in missing:
            start, stop = cache.shard_range(shard)
            batches = (
                {
                    "path": np.array(layout.image_paths(s, min(s + batch_size, stop)), dtype=object),
                    "landmarks": layout.landmarks[s : min(s + batch_size, stop)],
                    "faceness": layout.faceness[s : min(s + batch_size, stop)],
                }
                for s in range(start, stop, batch_size)
            )
            parts = []
            for out in run(extractor, batches):
                parts.append(out)
                bar.update(len(out["features"]))
            cache.write_shard(
                shard,
                np.concatenate([p["features"] for p in parts]),
                np.concatenate([p["score"] for p in parts]),
                np.concatenate([p["flag"] for p in parts]),
            )
    return cache


# ------------------------------------------------------------------------------------- evaluation
@dataclass
class ConfigResult:
    name: str
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
    shards = ((start, f, s) for start, f, s, _ in tqdm(cache.iter_shards(), total=cache.num_shards, desc="pooling", unit="shard", disable=not progress))
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
    }
    results = []
    for config in configs:
        scores = score_pairs(template_feats[config], rows1, rows2)
        name = f"{method} {config.code}"
        if scores_dir is not None:
            path = Path(scores_dir) / f"{_file_safe(name)}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, scores)
            os.replace(tmp, path)
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


def write_report(results: Sequence[ConfigResult], output_dir: str | os.PathLike, title: str = "ROC on IJB") -> dict[str, Path]:
    """``tar_far.json`` (list of {"TAR@FAR", "config"}), ``<name>.json`` each, ``table.md``, ``roc.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "tar_far.json", "table": output_dir / "table.md", "roc": output_dir / "roc.png"}
    for result in results:
        atomic_write_text(output_dir / f"{_file_safe(result.name)}.json", json.dumps(result.to_json(), indent=1))
    atomic_write_text(paths["json"], json.dumps([r.to_json() for r in results], indent=1))
    atomic_write_text(paths["table"], format_table([(r.name, r.tar_at_far) for r in results]) + "\n")
    plot_roc([(r.name, r.fpr, r.tpr) for r in results], paths["roc"], title)
    return paths
