"""The embedding sets an audit reads: a facepipe embedding folder (identity = folder), or an insightface
``.bin`` evaluation set embedded on the fly with the training set's model.

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
