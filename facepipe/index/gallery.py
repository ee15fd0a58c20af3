"""FAISS galleries of face embeddings: inner product on L2-normalised vectors (= cosine similarity).

Files of a gallery ``G.faiss``:

    G.faiss           the FAISS index, an ``IndexIDMap2`` around flat / HNSW / IVF-Flat / IVF-PQ
    G.faiss.parquet   id -> path, identity, source embedding folder, norm, det_score
    G.faiss.json      index type and search parameters, the embedding spec (model, weights, flip...) so that
                      queries are embedded the same way, and recall@k against exact search measured at build

Up to a few million faces exact ``flat`` search is the right default (REFERENCE.md: 1.5 ms per query at
100k, recall 1.0); approximate types trade recall for speed and memory, and ``build`` reports that recall.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from facepipe.embedding.base import l2_normalize
from facepipe.embedding.store import EmbeddingStoreError, iter_shards, read_manifest
from facepipe.io.atomic import atomic_path, atomic_write_text
from facepipe.io.files import MiB, check_regular_file, first_line, read_file_bounded

INDEX_TYPES = ("flat", "hnsw", "ivfflat", "ivfpq")
MAPPING_COLUMNS = ["id", "path", "identity", "source", "norm", "det_score"]


class GalleryError(RuntimeError):
    """The gallery or its inputs are missing or inconsistent."""


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("FAISS galleries need faiss: pip install 'facepipe[faiss]'") from exc
    return faiss


@dataclass
class IndexParams:
    index_type: str = "flat"
    nlist: int | None = None  # IVF cells; default ~4 sqrt(N), at least 39 training points per cell
    nprobe: int | None = None  # IVF cells visited per query; default nlist / 8
    pq_m: int | None = None  # PQ sub-quantisers (must divide the dimension); default D / 8
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")


def make_index(dim: int, count: int, params: IndexParams) -> Any:
    """An empty ``IndexIDMap2`` of the requested type, sized for ``count`` vectors."""
    faiss = _faiss()
    metric = faiss.METRIC_INNER_PRODUCT
    if params.index_type == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif params.index_type == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, params.hnsw_m, metric)
        inner.hnsw.efConstruction = params.ef_construction
        inner.hnsw.efSearch = params.ef_search
    else:
        nlist = params.nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
        params.nlist = nlist
        quantizer = faiss.IndexFlatIP(dim)
        if params.index_type == "ivfflat":
            inner = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        else:
            m = params.pq_m or _default_pq_m(dim)
            if dim % m:
                raise ValueError(f"--pq-m {m} must divide the embedding dimension {dim}")
            params.pq_m = m
            # k-means of each sub-quantiser needs at least 2**bits training points
            params.pq_bits = max(1, min(params.pq_bits, int(math.log2(max(count, 2)))))
            inner = faiss.IndexIVFPQ(quantizer, dim, nlist, m, params.pq_bits, metric)
        params.nprobe = params.nprobe or max(1, nlist // 8)
        inner.nprobe = params.nprobe
    return faiss.IndexIDMap2(inner)  # faiss's Python layer keeps the wrapped index (and quantizer) alive


def _default_pq_m(dim: int) -> int:
    for m in (dim // 8, 64, 32, 16, 8, 4, 2, 1):
        if m >= 1 and dim % m == 0:
            return m
    return 1


def apply_search_params(index: Any, params: IndexParams) -> None:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if params.index_type == "hnsw":
        inner.hnsw.efSearch = params.ef_search
    elif params.index_type in ("ivfflat", "ivfpq") and params.nprobe:
        inner.nprobe = params.nprobe


def recall_at_k(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k."""
    k = min(k, exact_ids.shape[1])
    hits = [len(set(e[:k]) & set(a[:k])) / k for e, a in zip(exact_ids, approx_ids)]
    return float(np.mean(hits)) if hits else float("nan")


@dataclass
class GalleryInfo:
    params: IndexParams
    dim: int
    count: int
    spec: dict[str, Any] = field(default_factory=dict)  # the embedding run's settings (model, weights, flip...)
    recall: dict[str, float] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "params": asdict(self.params)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GalleryInfo":
        data = json.loads(text)
        data["params"] = IndexParams(**data["params"])
        return cls(**data)


def _sidecars(index_path: Path) -> tuple[Path, Path]:
    return index_path.with_name(index_path.name + ".parquet"), index_path.with_name(index_path.name + ".json")


def _ok_rows(rows: pd.DataFrame) -> np.ndarray:
    return (rows["status"] == "ok").to_numpy()


def _read_spec(emb_dir: Path) -> dict[str, Any]:
    run = emb_dir / "run.json"
    if not run.is_file():
        return {}
    spec = json.loads(run.read_text())
    keep = ("model", "weights", "flip", "normalize", "dtype", "options", "embedding_size")
    return {k: spec.get(k) for k in keep}


def build_gallery(
    emb_dirs: Sequence[str | os.PathLike],
    out_path: str | os.PathLike,
    params: IndexParams | None = None,
    recall_queries: int = 1000,
    recall_k: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> GalleryInfo:
    """Index every ``ok`` row of the embedding folders; returns the gallery's info (recall for approximate types)."""
    from tqdm import tqdm

    faiss = _faiss()
    params = params or IndexParams()
    if params.threads:
        faiss.omp_set_num_threads(params.threads)
    emb_dirs = [Path(d) for d in emb_dirs]
    if not emb_dirs:
        raise GalleryError("no embedding folders given")
    manifests, specs = [], []
    for emb_dir in emb_dirs:
        try:
            manifests.append(read_manifest(emb_dir))
        except EmbeddingStoreError as exc:
            raise GalleryError(str(exc)) from exc
        specs.append(_read_spec(emb_dir))
    model_keys = {(s.get("model"), s.get("weights"), s.get("flip")) for s in specs}
    if len(model_keys) > 1:
        raise GalleryError(f"embedding folders were made with different models / settings: {sorted(map(str, model_keys))}")
    count = int(sum(_ok_rows(m).sum() for m in manifests))
    if count == 0:
        raise GalleryError("the embedding folders hold no usable embeddings")
    dim = None

    def ok_chunks() -> Iterable[tuple[np.ndarray, pd.DataFrame, Path]]:
        for emb_dir in emb_dirs:
            for matrix, rows in iter_shards(emb_dir):
                keep = _ok_rows(rows)
                if keep.any():
                    yield l2_normalize(np.asarray(matrix, dtype=np.float32)[keep]), rows[keep].reset_index(drop=True), emb_dir

    first_matrix, _, _ = next(iter(ok_chunks()))
    dim = first_matrix.shape[1]
    index = make_index(dim, count, params)
    rng = np.random.default_rng(seed)
    if not index.is_trained:  # IVF: train on a random sample, drawn shard by shard to bound memory
        train_size = min(count, max(256 * (params.nlist or 1), 2 ** params.pq_bits * 4, 50_000))
        probability = train_size / count
        sample = np.concatenate([m[rng.random(len(m)) < probability] for m, _, _ in ok_chunks()])
        if len(sample) < (params.nlist or 1):
            sample = np.concatenate([m for m, _, _ in ok_chunks()])
        index.train(sample)
    mappings, next_id = [], 0
    queries: list[np.ndarray] = []
    query_probability = min(1.0, recall_queries / count)
    bar = tqdm(total=count, unit="vec", desc=f"index {params.index_type}", disable=not progress)
    for matrix, rows, emb_dir in ok_chunks():
        ids = np.arange(next_id, next_id + len(matrix), dtype=np.int64)
        index.add_with_ids(matrix, ids)
        next_id += len(matrix)
        mapping = rows[["path", "identity", "norm", "det_score"]].copy()
        mapping.insert(0, "id", ids)
        mapping.insert(3, "source", str(emb_dir.resolve()))
        mappings.append(mapping)
        if params.index_type != "flat":
            queries.append(matrix[rng.random(len(matrix)) < query_probability])
        bar.update(len(matrix))
    bar.close()

    info = GalleryInfo(params=params, dim=dim, count=count, spec=specs[0], sources=[str(d.resolve()) for d in emb_dirs])
    if params.index_type != "flat":
        info.recall = measure_recall(index, np.concatenate(queries) if queries else first_matrix[:1], ok_chunks, recall_k, dim)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    mapping_path, info_path = _sidecars(out_path)
    _write_atomic(mapping_path, lambda tmp: pd.concat(mappings, ignore_index=True)[MAPPING_COLUMNS].to_parquet(tmp, index=False))
    atomic_write_text(info_path, info.to_json())
    _write_atomic(out_path, lambda tmp: faiss.write_index(index, str(tmp)))  # last: its presence means complete
    return info


def measure_recall(index: Any, queries: np.ndarray, chunks, k: int, dim: int) -> dict[str, float]:
    """recall@1 and recall@k of ``index`` against exact inner-product search over the same vectors."""
    faiss = _faiss()
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    next_id = 0
    for matrix, _, _ in chunks():
        exact.add_with_ids(matrix, np.arange(next_id, next_id + len(matrix), dtype=np.int64))
        next_id += len(matrix)
    k = min(k, exact.ntotal)
    _, exact_ids = exact.search(queries, k)
    _, approx_ids = index.search(queries, k)
    return {"recall@1": recall_at_k(exact_ids, approx_ids, 1), f"recall@{k}": recall_at_k(exact_ids, approx_ids, k),
            "queries": float(len(queries))}


def _write_atomic(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def _read_index_bounded(faiss: Any, path: Path, size: int) -> Any:
    """``faiss.read_index`` with FAISS's per-vector allocation limit lowered to what the file can hold: FAISS
    allocates a vector before reading it, so a damaged header declaring billions of codes would otherwise
    allocate (up to 1 TiB by default) instead of failing."""
    get_limit = getattr(faiss, "get_deserialization_vector_byte_limit", None)
    if get_limit is None:
        return faiss.read_index(str(path))
    previous = get_limit()
    # FAISS compares element count with limit / (4 * element size): a vector may then take at most limit / 4 bytes.
    faiss.set_deserialization_vector_byte_limit(min(previous, 4 * (size + MiB)))
    try:
        return faiss.read_index(str(path))
    finally:
        faiss.set_deserialization_vector_byte_limit(previous)


class Gallery:
    """A built gallery opened for search."""

    def __init__(self, path: str | os.PathLike) -> None:
        faiss = _faiss()
        self.path = Path(path)
        mapping_path, info_path = _sidecars(self.path)
        for needed in (self.path, mapping_path, info_path):
            if not os.path.lexists(needed):  # other non-files are refused with their kind below
                raise GalleryError(f"gallery file missing: {needed} (build it with `facepipe index build`)")
        try:  # regular files only: faiss and pyarrow would block on a FIFO
            self.index = _read_index_bounded(faiss, self.path, check_regular_file(self.path).st_size)
        except Exception as exc:  # FileReadError, or faiss's RuntimeError on a damaged or foreign file
            raise GalleryError(f"{self.path}: not a readable FAISS index ({first_line(exc)})") from None
        try:
            check_regular_file(mapping_path)
            self.mapping = pd.read_parquet(mapping_path)
            missing = set(MAPPING_COLUMNS) - set(self.mapping.columns)
            if missing:
                raise ValueError(f"missing columns {sorted(missing)}")
            self.mapping = self.mapping.set_index("id", drop=False)
        except Exception as exc:  # FileReadError, pyarrow's ArrowInvalid, KeyError: damaged or foreign file
            raise GalleryError(f"{mapping_path}: not a readable gallery mapping ({first_line(exc)})") from None
        try:
            self.info = GalleryInfo.from_json(read_file_bounded(info_path, 64 * MiB).decode("utf-8"))
        except Exception as exc:  # FileReadError, UnicodeDecodeError, JSONDecodeError, missing or unknown fields
            raise GalleryError(f"{info_path}: not a readable gallery description ({first_line(exc)})") from None
        if self.index.ntotal != len(self.mapping):
            raise GalleryError(f"{self.path}: index holds {self.index.ntotal} vectors, mapping {len(self.mapping)} rows")

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        if nprobe is not None:
            self.info.params.nprobe = nprobe
        if ef_search is not None:
            self.info.params.ef_search = ef_search
        apply_search_params(self.index, self.info.params)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of shape ``(Q, k)``; missing neighbours have id -1."""
        queries = l2_normalize(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.info.dim:
            raise GalleryError(f"queries are {queries.shape[1]}-d, the gallery {self.info.dim}-d: embed them with the gallery's model")
        return self.index.search(queries, min(k, max(1, self.index.ntotal)))

    def results_table(self, query_names: Sequence[str], scores: np.ndarray, ids: np.ndarray, extra: pd.DataFrame | None = None) -> pd.DataFrame:
        """Long table: one row per (query, rank) with the neighbour's path and identity."""
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)
        found = flat_ids >= 0
        hits = self.mapping.reindex(flat_ids[found])
        table = pd.DataFrame(
            {
                "query": np.repeat(np.asarray(query_names, dtype=object), k)[found],
                "rank": np.tile(np.arange(1, k + 1), len(query_names))[found],
                "score": scores.reshape(-1)[found].astype(float),
                "id": flat_ids[found].astype(np.int64),
                "path": hits["path"].to_numpy(),
                "identity": hits["identity"].to_numpy(),
                "source": hits["source"].to_numpy(),
            }
        )
        if extra is not None and len(table):
            table = table.merge(extra, on="query", how="left")
        return table
