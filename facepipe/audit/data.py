"""The embedding sets an audit reads: a facepipe embedding folder (identity = folder), or an insightface
``.bin`` evaluation set embedded on the fly with the training set's model.

Rows that cannot take part are skipped and counted, never silently: manifest ``error`` rows, non-finite
embeddings, zero vectors. Vectors are stored L2-normalised, as float16 past 2 GiB of float32 (cosines to 1e-3,
far below any threshold's resolution) so that an MS1M-size set fits in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FLOAT16_ABOVE_BYTES = 2 << 30


class AuditInputError(ValueError):
    """An input set is missing, empty, or made with another model."""


@dataclass
class EmbeddingSet:
    name: str
    vectors: np.ndarray  # (N, D) unit rows, float32 or float16
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
    from facepipe.embedding.store import EmbeddingStoreError, iter_shards, read_manifest

    emb_dir = Path(emb_dir)
    run_file = emb_dir / "run.json"
    if not run_file.is_file():
        raise AuditInputError(f"{emb_dir}: not a facepipe embedding folder (no run.json)")
    run = json.loads(run_file.read_text())
    try:
        manifest = read_manifest(emb_dir)
    except EmbeddingStoreError as exc:
        raise AuditInputError(str(exc)) from None
    vectors: np.ndarray | None = None  # allocated at the first shard, whose width is the embedding size
    paths: list[str] = []
    identities: list[str] = []
    filled = 0
    skipped = {"error_rows": 0, "non_finite": 0, "zero_vectors": 0}
    for matrix, rows in iter_shards(emb_dir, manifest=manifest):
        matrix = np.asarray(matrix, dtype=np.float32)
        if vectors is None:
            dtype = np.float16 if len(manifest) * matrix.shape[1] * 4 > FLOAT16_ABOVE_BYTES else np.float32
            vectors = np.empty((len(manifest), matrix.shape[1]), dtype=dtype)
        ok = (rows["status"] == "ok").to_numpy()
        skipped["error_rows"] += int((~ok).sum())
        finite = np.isfinite(matrix).all(axis=1)
        skipped["non_finite"] += int((ok & ~finite).sum())
        norms = np.linalg.norm(np.where(finite[:, None], matrix, 0), axis=1)
        nonzero = norms > 0
        skipped["zero_vectors"] += int((ok & finite & ~nonzero).sum())
        good = ok & finite & nonzero
        n = int(good.sum())
        vectors[filled : filled + n] = (matrix[good] / norms[good, None]).astype(vectors.dtype)
        paths.extend(rows["path"][good].tolist())
        identities.extend(rows["identity"][good].tolist())
        filled += n
    if filled == 0 or vectors is None:
        raise AuditInputError(f"{emb_dir}: no usable embeddings ({skipped})")
    names, codes = np.unique(np.array(identities, dtype=object), return_inverse=True)
    return EmbeddingSet(
        name or emb_dir.name,
        vectors[:filled],
        paths,
        codes.astype(np.int64),
        [str(n) for n in names],
        _model_of(run),
        _image_root(run),
        skipped,
    )


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
