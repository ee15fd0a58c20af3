"""The embedding sets an audit reads: a facepipe embedding folder (identity = folder), or an evaluation set
embedded on the fly with the training set's model: an insightface ``.bin`` (no identities) or an IJB-C / IJB-B
layout root (identity = subject).

Rows that cannot take part are skipped and counted, never silently: manifest ``error`` rows, non-finite
embeddings, zero vectors. A folder's vectors stay in its shard files (``facepipe.audit.rows``: read on demand and
L2-normalised on read), so an MS1M-size set (12 GB of float32) is audited in bounded memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.audit.rows import ShardFile, ShardRows


class AuditInputError(ValueError):
    """An input set is missing, empty, or made with another model."""


@dataclass
class EmbeddingSet:
    name: str
    vectors: np.ndarray | ShardRows  # (N, D) unit rows: in memory, or read from a folder's shards
    paths: list[str]  # relative to ``image_root`` (crops) or ``<bin>#<index>``
    identity: np.ndarray  # (N,) int64 codes into ``names``; -1 where the set has no identities
    names: list[str]
    model: dict[str, Any]  # model, weights, flip, embedding_size: sets of other models are refused
    image_root: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def has_identities(self) -> bool:
        return bool(len(self.names)) and bool((self.identity >= 0).any())


def _model_of(run: dict[str, Any]) -> dict[str, Any]:
    return {key: run.get(key) for key in ("model", "weights", "flip", "embedding_size", "options")}


def _image_root(run: dict[str, Any]) -> Path | None:
    """The folder the crops' paths are relative to (for the report's thumbnails); None for RecordIO / tar input."""
    root = run.get("input") or run.get("aligned_dir")
    return Path(root) if root and Path(root).is_dir() else None


def load_embedding_folder(emb_dir: str | Path, name: str | None = None) -> EmbeddingSet:
    """An embedding folder written by ``facepipe embed`` (identity = the crop's folder path)."""
    from facepipe.embedding.store import SHARD_PREFIX, SHARDS_DIR, EmbeddingStoreError, iter_shards, read_manifest

    emb_dir = Path(emb_dir)
    run_file = emb_dir / "run.json"
    if not run_file.is_file():
        raise AuditInputError(f"{emb_dir}: not a facepipe embedding folder (no run.json)")
    run = json.loads(run_file.read_text())
    try:
        manifest = read_manifest(emb_dir)
    except EmbeddingStoreError as exc:
        raise AuditInputError(str(exc)) from None
    shards: list[tuple[Path, np.ndarray]] = []  # (shard file, rows taken from it): the vectors stay on disk
    paths: list[str] = []
    identities: list[str] = []
    skipped = {"error_rows": 0, "non_finite": 0, "zero_vectors": 0}
    for _, rows in iter_shards(emb_dir, manifest=manifest):  # checks the rows; its memory map is never read
        path = emb_dir / SHARDS_DIR / f"{SHARD_PREFIX}-{int(rows['shard'].iloc[0]):06d}.npy"
        ok = (rows["status"] == "ok").to_numpy()
        skipped["error_rows"] += int((~ok).sum())
        finite, nonzero = _usable_rows(ShardFile(path), rows["row"].to_numpy())
        skipped["non_finite"] += int((ok & ~finite).sum())
        skipped["zero_vectors"] += int((ok & finite & ~nonzero).sum())
        good = ok & finite & nonzero
        shards.append((path, rows["row"].to_numpy()[good]))
        paths.extend(rows["path"][good].tolist())
        identities.extend(rows["identity"][good].tolist())
    if not paths:
        raise AuditInputError(f"{emb_dir}: no usable embeddings ({skipped})")
    names, codes = np.unique(np.array(identities, dtype=object), return_inverse=True)
    return EmbeddingSet(
        name or emb_dir.name,
        ShardRows(shards),
        paths,
        codes.astype(np.int64),
        [str(n) for n in names],
        _model_of(run),
        _image_root(run),
        skipped,
    )


def _usable_rows(shard: ShardFile, positions: np.ndarray, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(finite, non-zero) for rows ``positions`` of a shard file, read in blocks."""
    finite = np.zeros(len(positions), dtype=bool)
    nonzero = np.zeros(len(positions), dtype=bool)
    for start in range(0, len(positions), block):
        rows = shard.read(positions[start : start + block]).astype(np.float32)
        ok = np.isfinite(rows).all(axis=1)
        finite[start : start + block] = ok
        nonzero[start : start + block] = np.linalg.norm(np.where(ok[:, None], rows, 0), axis=1) > 0
    return finite, nonzero


def load_bin_set(bin_path: str | Path, model: dict[str, Any], device: str = "cpu", batch_size: int = 64) -> EmbeddingSet:
    """An insightface ``.bin`` (aligned crops, no identities) embedded with ``model`` (flip test as the training
    set's ``flip``)."""
    from facepipe.embedding.base import create_embedder, l2_normalize
    from facepipe.io.verification_bin import VerificationBinError, load_bin

    bin_path = Path(bin_path)
    try:
        images, _ = load_bin(bin_path)
    except VerificationBinError as exc:
        raise AuditInputError(str(exc)) from None
    options = dict(model.get("options") or {})
    embedder = create_embedder(model["model"], weights=model.get("weights"), device=device, batch_size=batch_size, **options)
    raw = embedder.embed(images, flip=bool(model.get("flip", True)))
    vectors = l2_normalize(raw).astype(np.float32)
    paths = [f"{bin_path.name}#{i}" for i in range(len(vectors))]
    return EmbeddingSet(bin_path.name, vectors, paths, np.full(len(vectors), -1, np.int64), [], dict(model, embedding_size=raw.shape[1]))


def check_same_model(train: EmbeddingSet, other: EmbeddingSet, role: str = "training set") -> None:
    """Refuse (one line) sets embedded with another model or dimension: their cosines mean nothing together.
    ``role`` names ``train`` in the message (the audit's training set, identification's gallery)."""
    if train.vectors.shape[1] != other.vectors.shape[1]:
        raise AuditInputError(
            f"{other.name}: {other.vectors.shape[1]}-d embeddings, the {role}'s are {train.vectors.shape[1]}-d (another model)"
        )
    differ = [k for k in ("model", "weights", "flip") if train.model.get(k) != other.model.get(k)]
    if differ:
        raise AuditInputError(
            f"{other.name}: embedded with another model ({', '.join(f'{k} {other.model.get(k)!r} vs {train.model.get(k)!r}' for k in differ)})"
        )


def ijb_target(root: str | Path) -> str | None:
    """``IJBC`` / ``IJBB`` when ``root`` is an IJB layout root (``meta/<target>_face_tid_mid.txt``), else None."""
    from facepipe.evaluation.ijbc_layout import TARGETS, meta_paths

    return next((target for target in TARGETS if meta_paths(root, target)["tid_mid"].is_file()), None)


def load_ijb_set(
    root: str | Path, model: dict[str, Any], cache_root: str | Path, device: str = "cpu", batch_size: int = 64, progress: bool = False
) -> EmbeddingSet:
    """An IJB-C / IJB-B layout root (the one ``facepipe eval ijbc`` reads) embedded with ``model`` (a training
    folder's ``run.json`` model) through the IJB-C feature path: images aligned from their given five points, the
    ``[plain, mirrored]`` features of the content-keyed, resumable feature cache under ``cache_root``, summed
    when the training set was embedded with flip. Identity = the subject of the 1:N files (every template of a
    subject together); without 1:N files, each template is an identity (``template <id>``): the 1:1 meta files
    name no subjects. Images of templates no 1:N file names, and images the cache marks unreadable or failed
    (zero features), are skipped and counted. Refused (one line) when the model cannot be rebuilt."""
    from facepipe.commands.eval_ijbc import run_feature_job  # the one place IJB-C features meet an engine
    from facepipe.embedding.base import l2_normalize
    from facepipe.evaluation.ijbc_1n import protocol_paths, read_1n_protocol
    from facepipe.evaluation.ijbc_features import FLAG_FAILED, FLAG_UNREADABLE, FeatureCache, FeatureCacheError, IJBFeatureJob, cache_folder
    from facepipe.evaluation.ijbc_layout import read_ijb_layout

    root = Path(root)
    target = ijb_target(root)
    if target is None:
        raise AuditInputError(f"{root}: not an IJB-C / IJB-B layout root (no meta/ijbc_face_tid_mid.txt)")
    extractor = _ijb_extractor(root, model, device)
    try:
        layout = read_ijb_layout(root, target)
        one_to_n = [path for path in protocol_paths(root, target).values() if path.is_file()]
        subject_sets = read_1n_protocol(root, target, layout) if one_to_n else None
        key = extractor.cache_key(layout)
        cache = FeatureCache(cache_folder(cache_root, target, str(model["model"]), "given", key), key, layout.num_images)
        run_feature_job(IJBFeatureJob(layout, cache, extractor, batch_size), "local", progress=progress)
        flip = bool(model.get("flip", True))
        raw, flags = [], []  # one (n, D) block per shard: the (n, 2, D) pairs are never all in memory
        for _, features, _, shard_flags in cache.iter_shards():
            raw.append(features[:, 0] + features[:, 1] if flip else features[:, 0])  # the embedder's flip test sums them
            flags.append(shard_flags)
    except (ValueError, FileNotFoundError, FeatureCacheError) as exc:  # meta errors, a foreign cache, weights
        raise AuditInputError(f"{root}: {exc}") from None
    if subject_sets is None:
        identity_of = {int(t): f"template {t}" for t in np.unique(layout.templates)}
    else:
        galleries, probes = subject_sets
        identity_of = {int(t): str(s) for group in (*galleries, probes) for t, s in zip(group.templates, group.subjects)}
    raw, flags = np.concatenate(raw), np.concatenate(flags)
    identities = np.array([identity_of.get(int(t), "") for t in layout.templates], dtype=object)
    finite = np.isfinite(raw).all(axis=1)
    nonzero = np.linalg.norm(np.where(finite[:, None], raw, 0), axis=1) > 0
    unreadable = np.isin(flags, (FLAG_UNREADABLE, FLAG_FAILED))
    has_subject = identities != ""
    skipped = {
        "unreadable_images": int(unreadable.sum()),
        "no_subject": int((~unreadable & ~has_subject).sum()),
        "non_finite": int((~unreadable & has_subject & ~finite).sum()),
        "zero_vectors": int((~unreadable & has_subject & finite & ~nonzero).sum()),
    }
    good = ~unreadable & has_subject & finite & nonzero
    if not good.any():
        raise AuditInputError(f"{root}: no usable images ({skipped})")
    names, codes = np.unique(identities[good], return_inverse=True)
    return EmbeddingSet(
        f"{root.name} ({target})",
        l2_normalize(raw[good]).astype(np.float32),
        [str(n) for n in layout.image_names[good]],
        codes.astype(np.int64),
        [str(n) for n in names],
        dict(model, embedding_size=int(raw.shape[1])),
        layout.image_dir,
        skipped,
    )


def _ijb_extractor(root: Path, model: dict[str, Any], device: str):
    """The IJB-C feature extractor for the training folder's model, built now so that a model that cannot be
    rebuilt is one line before any image is read."""
    from facepipe.evaluation.ijbc_features import FeatureExtractor

    name, weights = model.get("model"), model.get("weights")
    if not name:
        raise AuditInputError(f"{root}: the training folder's run.json names no model, so its images cannot be embedded the same way")
    if weights and not Path(weights).is_file():
        raise AuditInputError(f"{root}: the training set's weights {weights} (named in its run.json) are not there; cannot embed with the same model")
    options = dict(model.get("options") or {})
    precision = str(options.pop("precision", "fp32"))
    extractor = FeatureExtractor(model=str(name), weights=weights, device=device, precision=precision, options=options)
    try:
        extractor.models()
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        raise AuditInputError(f"{root}: cannot rebuild the training set's model {name!r} ({exc})") from None
    return extractor
