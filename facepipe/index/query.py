"""Turn a search query (an image, a folder of aligned crops, or an embedding folder) into embeddings made
exactly like the gallery's (same model, weights, flip and options, read from the gallery's settings)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from facepipe.embedding.store import MANIFEST_NAME, RUN_FILE, CropEmbedder, EmbedSpec, list_crops, load_embeddings
from facepipe.io.images import is_image_path


class QueryError(ValueError):
    """The query cannot be turned into embeddings."""


@dataclass
class Queries:
    names: list[str]
    embeddings: np.ndarray  # (Q, D) float32
    details: pd.DataFrame  # one row per query: "query" plus whatever locates it (box, det_score, ...)


def spec_from_settings(settings: dict[str, Any]) -> EmbedSpec:
    if not settings.get("model"):
        raise QueryError("the gallery does not record which model made its embeddings; query with an embedding folder")
    return EmbedSpec(
        model=settings["model"], weights=settings.get("weights"), flip=bool(settings.get("flip", True)),
        normalize=True, dtype="float32", options=dict(settings.get("options") or {}),
    )


def is_embedding_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file() and (path / RUN_FILE).is_file() and (path / "shards").is_dir()


def embed_query(
    query: str | os.PathLike,
    settings: dict[str, Any],
    detector: str = "retinaface",
    detector_weights: str | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    min_score: float = 0.5,
    detector_options: dict[str, Any] | None = None,
) -> Queries:
    """Embeddings of ``query``; an image is detected with ``detector`` (and ``detector_options``, e.g. its
    precision) and embedded with the gallery's own settings (model, weights, precision, flip)."""
    query = Path(query)
    if is_embedding_dir(query):
        matrix, manifest = load_embeddings(query)
        keep = (manifest["status"] == "ok").to_numpy()
        names = manifest.loc[keep, "path"].tolist()
        details = pd.DataFrame({"query": names, "query_identity": manifest.loc[keep, "identity"].tolist()})
        return Queries(names, np.asarray(matrix, dtype=np.float32)[keep], details)
    spec = spec_from_settings(settings)
    if query.is_dir():
        rel_paths = list_crops(query)
        if not rel_paths:
            raise QueryError(f"no image files under {query}")
        embedder = CropEmbedder(query, spec, device=device, batch_size=batch_size)
        batch = embedder.embed_paths(rel_paths)
        keep = np.array([s == "ok" for s in batch.status])
        names = [p for p, k in zip(rel_paths, keep) if k]
        details = pd.DataFrame({"query": names})
        return Queries(names, batch.embeddings[keep].astype(np.float32), details)
    if is_image_path(query):
        return _embed_image(query, spec, detector, detector_weights, device, batch_size, min_score, detector_options or {})
    raise QueryError(f"{query}: not an image, a folder of aligned crops, or an embedding folder")


def _embed_image(
    path: Path, spec: EmbedSpec, detector_name: str, detector_weights: str | None, device: str, batch_size: int,
    min_score: float, detector_options: dict[str, Any] | None = None,
) -> Queries:
    """Every face of one photo (score >= ``min_score``), detected, aligned and embedded as ``embed --detect
    --keep all`` does."""
    import pyarrow as pa

    from facepipe.embedding.photos import DetectSpec, FaceEmbedder
    from facepipe.embedding.store import embeddings_of
    from facepipe.pipeline.sources import FileSource

    source = FileSource([path], path.parent, str(path))
    detect = DetectSpec(detector=detector_name, detector_weights=detector_weights, detector_options=dict(detector_options or {}),
                        keep="all", min_score=min_score)
    rows = FaceEmbedder(source, detect, spec, device=device, batch_size=batch_size)(source.items())
    status = rows.column("status").to_pylist()
    if status == ["error"]:
        raise QueryError(f"{path}: {rows.column('reason')[0].as_py()}")
    keep = np.array([s == "ok" for s in status])
    if not keep.any():
        return Queries([], np.zeros((0, 0), dtype=np.float32), pd.DataFrame({"query": []}))
    faces = rows.filter(pa.array(keep))
    names = faces.column("path").to_pylist()
    details = pd.DataFrame(
        {
            "query": names,
            "query_box": [[round(float(v), 1) for v in box] for box in faces.column("box").to_pylist()],
            "query_det_score": faces.column("det_score").to_pylist(),
        }
    )
    return Queries(names, embeddings_of(faces).astype(np.float32), details)
