"""Embeddings on disk: sharded ``.npy`` matrices plus a parquet manifest, written resumably.

Layout of an embedding folder::

    EMB_DIR/run.json                      settings and input digest (a resume must match them)
    EMB_DIR/shards/emb-000000.npy         (n_i, D) float32 or float16, row r = manifest row r of the shard
    EMB_DIR/shards/emb-000000.parquet     that shard's manifest rows; written after the .npy: its presence
                                          means the shard is complete
    EMB_DIR/manifest.parquet              all shards' rows, merged at the end

Every file is written to a temporary name and renamed, so an interrupted run leaves only complete shards and a
rerun skips them. Crops that cannot be read keep their row (``status="error"``, zero vector) so that row
numbers always line up with the matrix.

``CropEmbedder`` is the per-batch work (relative paths in, embeddings out): a plain picklable class that
builds its embedder lazily in the process that uses it, so that a Ray Data job can reuse it as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from facepipe.embedding.base import Embedder, create_embedder
from facepipe.io.atomic import atomic_path, atomic_write_text
from facepipe.io.images import ImageDecodeError, list_images, read_image

MANIFEST_NAME = "manifest.parquet"
RUN_FILE = "run.json"
SHARDS_DIR = "shards"
ALIGN_MANIFEST_NAME = "manifest.parquet"
STATE_DIRS = {".facepipe", SHARDS_DIR}

MANIFEST_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # global row in the concatenated matrix
        ("shard", pa.int32()),
        ("row", pa.int32()),  # row inside the shard
        ("path", pa.string()),  # relative to the aligned folder, POSIX separators
        ("identity", pa.string()),  # the crop's folder name ("" at top level)
        ("norm", pa.float32()),  # L2 norm of the raw (flip-summed) embedding: a quality signal
        ("det_score", pa.float32()),  # detector score carried from the align manifest; NaN when unknown
        ("status", pa.string()),  # ok | error
        ("reason", pa.string()),
    ]
)


class EmbeddingStoreError(RuntimeError):
    """The embedding folder is missing, incomplete, or holds a run with other settings."""


@dataclass(frozen=True)
class EmbedSpec:
    """Everything that decides the stored numbers (recorded in ``run.json``; device and batch size are not)."""

    model: str = "mobilefacenet"
    weights: str | None = None
    flip: bool = True
    normalize: bool = True
    dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)  # model options that change outputs (ONNX mean/std...)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")


@dataclass
class EmbeddedBatch:
    embeddings: np.ndarray  # (N, D) in the spec's dtype; zero rows where status is error
    norms: np.ndarray  # (N,) float32 raw norms
    status: list[str]
    reason: list[str]


@dataclass
class LoadedCrops:
    count: int
    crops: list[np.ndarray]  # the readable ones
    good: list[int]  # their positions in the batch
    status: list[str]
    reason: list[str]


class CropEmbedder:
    """Reads aligned crops by relative path and embeds them. Picklable: the model is built on first use."""

    def __init__(
        self, root: str | os.PathLike, spec: EmbedSpec, device: str = "cpu", batch_size: int = 64, threads: int | None = None
    ) -> None:
        self.root = Path(root)
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._embedder: Embedder | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_embedder"] = None  # rebuilt where it runs
        return state

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            options = dict(self.spec.options)
            options["batch_size"] = self.batch_size
            if self.threads is not None:
                options["threads"] = self.threads
            self._embedder = create_embedder(self.spec.model, weights=self.spec.weights, device=self.device, **options)
        return self._embedder

    @property
    def embedding_size(self) -> int:
        return int(self.embedder.embedding_size)

    def load(self, rel_paths: Sequence[str]) -> "LoadedCrops":
        """Decode the crops (I/O and JPEG decoding: can run in another thread while the model works)."""
        size = getattr(getattr(self.embedder, "config", None), "input_size", None)
        crops, good, status, reason = [], [], [], []
        for i, rel in enumerate(rel_paths):
            try:
                crop = read_image(self.root / rel)
                if size is not None and crop.shape[:2] != tuple(size):
                    raise ImageDecodeError(f"crop is {crop.shape[0]}x{crop.shape[1]}, model expects {size[0]}x{size[1]}")
            except ImageDecodeError as exc:
                status.append("error")
                reason.append(str(exc))
                continue
            crops.append(crop)
            good.append(i)
            status.append("ok")
            reason.append("")
        return LoadedCrops(len(rel_paths), crops, good, status, reason)

    def embed_loaded(self, loaded: "LoadedCrops") -> EmbeddedBatch:
        raw = np.zeros((loaded.count, self.embedding_size), dtype=np.float32)
        if loaded.crops:
            raw[loaded.good] = self.embedder.embed(np.stack(loaded.crops), flip=self.spec.flip)
        norms = np.linalg.norm(raw, axis=1).astype(np.float32)
        out = raw / np.maximum(norms, 1e-12)[:, None] if self.spec.normalize else raw
        return EmbeddedBatch(out.astype(self.spec.dtype), norms, loaded.status, loaded.reason)

    def embed_paths(self, rel_paths: Sequence[str]) -> EmbeddedBatch:
        return self.embed_loaded(self.load(rel_paths))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray Data ``map_batches`` form: ``{"path": [...]}`` in, the same plus embedding columns out."""
        paths = [str(p) for p in batch["path"]]
        result = self.embed_paths(paths)
        return {
            "path": np.asarray(paths, dtype=object),
            "embedding": result.embeddings,
            "norm": result.norms,
            "status": np.asarray(result.status, dtype=object),
            "reason": np.asarray(result.reason, dtype=object),
        }


def list_crops(aligned_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the crops under ``aligned_dir``, sorted, skipping facepipe's state folders."""
    root = Path(aligned_dir)
    if not root.is_dir():
        raise EmbeddingStoreError(f"aligned folder not found: {root}")
    rel = []
    for path in list_images(root):
        parts = path.relative_to(root).parts
        if parts and parts[0] in STATE_DIRS:
            continue
        rel.append(Path(*parts).as_posix())
    return sorted(rel)


def identity_of(rel_path: str) -> str:
    parent = Path(rel_path).parent
    return "" if str(parent) in ("", ".") else parent.name


def read_align_scores(aligned_dir: str | os.PathLike) -> dict[str, float]:
    """``output path -> detector score`` from the align manifest (``outputs`` / ``scores`` columns), if any."""
    path = Path(aligned_dir) / ALIGN_MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        table = pq.read_table(path, columns=["outputs", "scores"])
    except (pa.ArrowInvalid, KeyError, OSError):
        return {}  # not an align manifest: no scores to carry
    scores: dict[str, float] = {}
    for outputs, values in zip(table.column("outputs").to_pylist(), table.column("scores").to_pylist()):
        for name, score in zip(outputs or [], values or []):
            if score is not None:
                scores[str(name)] = float(score)
    return scores


@dataclass
class EmbedSummary:
    total: int
    embedded: int  # rows computed by this run (the rest were in finished shards)
    errors: int
    seconds: float
    out_dir: Path

    def format(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.total} crops: {self.embedded} embedded now ({rate:.1f} crops/s), "
            f"{self.total - self.embedded} from finished shards, {self.errors} unreadable; {self.out_dir / MANIFEST_NAME}"
        )


def crops_to_embed(aligned_dir: str | os.PathLike, shard_size: int) -> list[str]:
    """The crops of an embedding run (relative paths, sorted); refuses a bad shard size or an empty folder."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    rel_paths = list_crops(aligned_dir)
    if not rel_paths:
        raise EmbeddingStoreError(f"no image files under {aligned_dir}")
    return rel_paths


def open_embedding_run(
    aligned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: "EmbedSpec",
    rel_paths: list[str],
    shard_size: int,
    embedding_size: int,
    overwrite: bool,
) -> tuple["EmbeddingStore", dict[str, float], list[tuple[int, list[str]]]]:
    """Start or resume the run in ``out_dir``: its store, the align manifest's detector scores, and the
    ``(shard, paths)`` still to embed. Shared by the local and the Ray engine so both resume the same way."""
    store = EmbeddingStore(out_dir)
    store.start(run_settings(spec, aligned_dir, rel_paths, shard_size, embedding_size), overwrite=overwrite)
    shards = [(i, rel_paths[start : start + shard_size]) for i, start in enumerate(range(0, len(rel_paths), shard_size))]
    done = store.done_shards()
    return store, read_align_scores(aligned_dir), [(i, paths) for i, paths in shards if i not in done]


def embed_directory(
    aligned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: EmbedSpec,
    device: str = "cpu",
    batch_size: int = 64,
    shard_size: int = 50_000,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> EmbedSummary:
    """Embed every crop under ``aligned_dir`` into ``out_dir``; resumes a finished part of the same run."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    started = time.perf_counter()
    rel_paths = crops_to_embed(aligned_dir, shard_size)
    worker = CropEmbedder(aligned_dir, spec, device=device, batch_size=batch_size, threads=threads)
    store, det_scores, todo = open_embedding_run(
        aligned_dir, out_dir, spec, rel_paths, shard_size, worker.embedding_size, overwrite
    )
    embedded = 0
    bar = tqdm(total=sum(len(p) for _, p in todo), unit="crop", desc="embed", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as reader:  # decode the next batch while the model runs
        for shard, paths in todo:
            batches = [paths[b : b + batch_size] for b in range(0, len(paths), batch_size)]
            results: list[EmbeddedBatch] = []
            pending = reader.submit(worker.load, batches[0])
            for b in range(len(batches)):
                loaded = pending.result()
                if b + 1 < len(batches):
                    pending = reader.submit(worker.load, batches[b + 1])
                results.append(worker.embed_loaded(loaded))
                bar.update(loaded.count)
            merged = EmbeddedBatch(
                np.concatenate([r.embeddings for r in results]),
                np.concatenate([r.norms for r in results]),
                [s for r in results for s in r.status],
                [s for r in results for s in r.reason],
            )
            store.commit_shard(shard, merged.embeddings, shard_rows(shard, shard * shard_size, paths, merged, det_scores))
            embedded += len(paths)
    bar.close()
    table = store.merge()
    errors_total = int(pa.compute.sum(pa.compute.equal(table.column("status"), "error")).as_py() or 0)
    return EmbedSummary(len(rel_paths), embedded, errors_total, time.perf_counter() - started, Path(out_dir))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _save_table(path: Path, table: pa.Table) -> None:
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp)


class EmbeddingStore:
    """Writer side of an embedding folder."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.shards_dir = self.out_dir / SHARDS_DIR

    def npy_path(self, shard: int) -> Path:
        return self.shards_dir / f"emb-{shard:06d}.npy"

    def part_path(self, shard: int) -> Path:
        return self.shards_dir / f"emb-{shard:06d}.parquet"

    def start(self, settings: dict[str, Any], overwrite: bool = False) -> None:
        """Create the folder, or check that the run found there has the same settings (resume)."""
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.shards_dir.glob("*.tmp"):
            stale.unlink()
        run_file = self.out_dir / RUN_FILE
        encoded = json.loads(json.dumps(settings, sort_keys=True))
        if run_file.is_file() and not overwrite:
            previous = json.loads(run_file.read_text())
            if previous != encoded:
                changed = sorted(k for k in set(previous) | set(encoded) if previous.get(k) != encoded.get(k))
                raise EmbeddingStoreError(
                    f"{self.out_dir} holds embeddings made with other settings or inputs ({', '.join(changed)} differ); "
                    "rerun with the same options, use another --out, or pass --overwrite"
                )
        if overwrite:
            for old in list(self.shards_dir.glob("emb-*")) + [self.out_dir / MANIFEST_NAME]:
                old.unlink(missing_ok=True)
        atomic_write_text(run_file, json.dumps(encoded, sort_keys=True, indent=1))

    def done_shards(self) -> set[int]:
        return {
            int(p.stem.split("-")[1]) for p in self.shards_dir.glob("emb-*.parquet") if self.npy_path(int(p.stem.split("-")[1])).is_file()
        }

    def commit_shard(self, shard: int, embeddings: np.ndarray, rows: pa.Table) -> None:
        if len(embeddings) != rows.num_rows:
            raise ValueError(f"shard {shard}: {len(embeddings)} embeddings for {rows.num_rows} manifest rows")
        _save_npy(self.npy_path(shard), embeddings)  # the matrix first: a committed part implies its matrix
        _save_table(self.part_path(shard), rows)

    def merge(self) -> pa.Table:
        parts = sorted(self.shards_dir.glob("emb-*.parquet"))
        table = pa.concat_tables([pq.read_table(p, schema=MANIFEST_SCHEMA) for p in parts]) if parts else MANIFEST_SCHEMA.empty_table()
        table = table.sort_by("index")
        _save_table(self.out_dir / MANIFEST_NAME, table)
        return table


def shard_rows(
    shard: int, first_index: int, rel_paths: Sequence[str], batch: EmbeddedBatch, det_scores: dict[str, float]
) -> pa.Table:
    n = len(rel_paths)
    return pa.Table.from_pydict(
        {
            "index": list(range(first_index, first_index + n)),
            "shard": [shard] * n,
            "row": list(range(n)),
            "path": list(rel_paths),
            "identity": [identity_of(p) for p in rel_paths],
            "norm": batch.norms.tolist(),
            "det_score": [det_scores.get(p, float("nan")) for p in rel_paths],
            "status": batch.status,
            "reason": batch.reason,
        },
        schema=MANIFEST_SCHEMA,
    )


def inputs_digest(rel_paths: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for p in rel_paths:
        digest.update(p.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def run_settings(
    spec: EmbedSpec, aligned_dir: str | os.PathLike, rel_paths: Sequence[str], shard_size: int, embedding_size: int
) -> dict[str, Any]:
    return {
        **asdict(spec),
        "embedding_size": embedding_size,
        "aligned_dir": str(Path(aligned_dir).resolve()),
        "num_inputs": len(rel_paths),
        "inputs_sha256": inputs_digest(rel_paths),
        "shard_size": shard_size,
    }


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(emb_dir: str | os.PathLike) -> pd.DataFrame:
    emb_dir = Path(emb_dir)
    path = emb_dir / MANIFEST_NAME
    if not path.is_file():
        raise EmbeddingStoreError(f"{emb_dir} has no {MANIFEST_NAME}: not an embedding folder, or the run did not finish")
    return pq.read_table(path, schema=MANIFEST_SCHEMA).to_pandas()


def iter_shards(emb_dir: str | os.PathLike, mmap: bool = True) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """``(matrix, manifest rows)`` shard by shard: galleries far larger than memory stream through this."""
    emb_dir = Path(emb_dir)
    manifest = read_manifest(emb_dir)
    for shard, rows in manifest.groupby("shard", sort=True):
        matrix = np.load(emb_dir / SHARDS_DIR / f"emb-{int(shard):06d}.npy", mmap_mode="r" if mmap else None)
        if len(matrix) != len(rows):
            raise EmbeddingStoreError(f"{emb_dir}: shard {shard} holds {len(matrix)} rows, manifest {len(rows)}")
        yield matrix, rows.reset_index(drop=True)


def load_embeddings(emb_dir: str | os.PathLike, mmap: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """The whole matrix (memory-mapped when the folder has one shard) and the manifest, rows aligned."""
    emb_dir = Path(emb_dir)
    manifest = read_manifest(emb_dir)
    matrices = [m for m, _ in iter_shards(emb_dir, mmap=mmap)]
    if not matrices:
        run = json.loads((emb_dir / RUN_FILE).read_text()) if (emb_dir / RUN_FILE).is_file() else {}
        return np.zeros((0, int(run.get("embedding_size", 0))), dtype=np.float32), manifest
    matrix = matrices[0] if len(matrices) == 1 else np.concatenate(matrices)
    return matrix, manifest
