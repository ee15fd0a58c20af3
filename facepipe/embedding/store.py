"""Embeddings on disk: sharded ``.npy`` matrices plus a parquet manifest, written resumably (``io/run_state``).

Layout of an embedding folder::

    EMB_DIR/run.json                      the settings that decide the numbers (a rerun must match them)
    EMB_DIR/shards/emb-000000.npy         (n_i, D) float32 or float16; matrix row r is the shard's manifest row
                                          whose ``row`` is r
    EMB_DIR/shards/emb-000000.parquet     that shard's manifest rows: the run's part marker, written after the
                                          .npy, so its presence means the shard is complete
    EMB_DIR/manifest.parquet              the rows of the current inputs, merged, sorted by input; ``index`` is
                                          the row in ``load_embeddings``' matrix

**Growing inputs.** The input list is not a setting. A rerun embeds only the crops (or, with ``--detect``, the
photos) no shard holds yet, as new shards, keeps the finished shards, and rewrites the merged manifest with the
rows of the inputs that are still there; a removed input's row stays in its shard but leaves the manifest. So
readers take matrix rows by ``(shard, row)``, never by position. Other settings are refused unless
``overwrite``, which deletes the old shards first.

Crops that cannot be read keep a row (``status="error"``, zero vector); with ``--detect`` a photo without a face
keeps one (``status="no_face"``), so a rerun does not detect it again.

The embed run is a ``BatchJob`` (``facepipe.engine.job``): units are shards, batches are lists of input
``Item``s, the worker (``CropEmbedder`` here, ``FaceEmbedder`` for ``--detect``) returns one Arrow table per batch
in the columns of ``result_schema``, and ``commit`` writes the shard's matrix, then its marker.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from facepipe.embedding.base import Embedder, create_embedder, l2_normalize
from facepipe.embedding.crops import CropFolderError, list_crops, open_crops
from facepipe.engine.job import Unit
from facepipe.io.atomic import atomic_path
from facepipe.io.images import ImageDecodeError, decode_image
from facepipe.io.recordio import RecordIOError
from facepipe.io.run_state import RunState, RunStateError, write_table_atomic
from facepipe.pipeline.sources import FileSource, Item, RecordIOSource, Source, identity_of, reader_only
from facepipe.quality import inter_ocular_distance, landmark_yaw, laplacian_sharpness
from facepipe.types import Face

__all__ = [
    "MANIFEST_NAME", "MANIFEST_SCHEMA", "RUN_FILE", "CropEmbedder", "EmbedJob", "EmbedSpec", "EmbedSummary",
    "EmbeddedBatch", "EmbeddingStore", "EmbeddingStoreError", "embed_directory", "embed_directory_job", "iter_shards",
    "list_crops",
    "load_embeddings", "read_manifest",
]

MANIFEST_NAME = "manifest.parquet"
RUN_FILE = "run.json"
SHARDS_DIR = "shards"
SHARD_PREFIX = "emb"
ALIGN_MANIFEST_NAME = "manifest.parquet"

# The manifest's columns, defined once: the worker's result columns are these less the four the job assigns
# (index, shard, row, identity), plus the embedding.
MANIFEST_FIELDS = [
    pa.field("index", pa.int64()),  # row in load_embeddings' matrix (set when the manifest is merged; -1 in parts)
    pa.field("shard", pa.int32()),
    pa.field("row", pa.int32()),  # row inside the shard's matrix
    pa.field("path", pa.string()),  # the crop's key (relative POSIX path, tar member, <identity>/<record>.jpg)
    pa.field("identity", pa.string()),  # pipeline.sources.identity_of(path): the whole parent path ("" at top level)
    pa.field("norm", pa.float32()),  # L2 norm of the raw (flip-summed) embedding: a quality signal
    pa.field("det_score", pa.float32()),  # detector score (align manifest, or --detect); NaN when unknown
    pa.field("sharpness", pa.float32()),  # facepipe.quality: variance of the Laplacian of the crop; NaN without one
    pa.field("status", pa.string()),  # ok | no_face | error
    pa.field("reason", pa.string()),
]
DETECTION_FIELDS = [  # --detect: where the face came from (original image pixels)
    pa.field("source", pa.string()),  # the photo's key; one row per kept face (--keep all: several)
    pa.field("box", pa.list_(pa.float32(), 4)),  # x1, y1, x2, y2
    pa.field("landmarks", pa.list_(pa.list_(pa.float32(), 2), 5)),  # (5, 2) in image order
    pa.field("inter_ocular", pa.float32()),  # facepipe.quality: eye distance in original pixels
    pa.field("yaw", pa.float32()),  # facepipe.quality: signed yaw estimate from the landmarks, degrees
]
QUALITY_COLUMNS = ("sharpness", "inter_ocular", "yaw")  # added later: read as unknown (NaN) from older folders
MANIFEST_SCHEMA = pa.schema(MANIFEST_FIELDS)
DETECTION_MANIFEST_SCHEMA = pa.schema(MANIFEST_FIELDS + DETECTION_FIELDS)
_ASSIGNED = ("index", "shard", "row", "identity")


def manifest_schema(detection: bool) -> pa.Schema:
    return DETECTION_MANIFEST_SCHEMA if detection else MANIFEST_SCHEMA


def result_schema(dim: int, dtype: str, detection: bool = False) -> pa.Schema:
    """The columns a worker returns per batch (one row per crop or kept face)."""
    fields = [f for f in manifest_schema(detection) if f.name not in _ASSIGNED]
    return pa.schema([fields[0], pa.field("embedding", pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), dim)), *fields[1:]])


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
    embeddings: np.ndarray  # (N, D) in the spec's dtype; zero rows where status is not ok
    norms: np.ndarray  # (N,) float32 raw norms
    status: list[str]
    reason: list[str]
    sharpness: np.ndarray | None = None  # (N,) facepipe.quality.laplacian_sharpness of each crop; NaN without one


def build_embedder(spec: EmbedSpec, device: str, batch_size: int, threads: int | None) -> Embedder:
    options = dict(spec.options)
    options["batch_size"] = batch_size
    if threads is not None:
        options["threads"] = threads
    return create_embedder(spec.model, weights=spec.weights, device=device, **options)


def embed_crops(
    embedder: Embedder, spec: EmbedSpec, crops: Sequence[np.ndarray], count: int, good: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(count, D)`` stored vectors (zero where no crop), raw norms and crop sharpness (NaN where no crop), from
    the crops at positions ``good``: the one place the spec's flip, normalisation and dtype are applied."""
    raw = np.zeros((count, int(embedder.embedding_size)), dtype=np.float32)
    sharpness = np.full(count, np.nan, dtype=np.float32)
    if len(good):
        raw[list(good)] = embedder.embed(np.stack(crops), flip=spec.flip)
        sharpness[list(good)] = laplacian_sharpness(crops)
    norms = np.linalg.norm(raw, axis=1).astype(np.float32)
    out = l2_normalize(raw) if spec.normalize else raw
    return out.astype(spec.dtype), norms, sharpness


class CropEmbedder:
    """The embed job's worker: reads aligned crops from a source and embeds them. Picklable: the model is built
    on first use (or in ``prepare``), in the process that uses it."""

    def __init__(
        self, source: Source | str | os.PathLike, spec: EmbedSpec, device: str = "cpu", batch_size: int = 64,
        threads: int | None = None,
    ) -> None:
        self.source = source if hasattr(source, "read") else FileSource([], Path(source), str(source))
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._embedder: Embedder | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_embedder"] = None  # rebuilt where it runs
        return state

    def for_device(self, device: str) -> "CropEmbedder":
        return CropEmbedder(self.source, self.spec, device, self.batch_size, self.threads)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = build_embedder(self.spec, self.device, self.batch_size, self.threads)
        return self._embedder

    @property
    def embedding_size(self) -> int:
        return int(self.embedder.embedding_size)

    def prepare(self) -> None:
        _ = self.embedder

    def _read(self, item: Item, size: tuple[int, int] | None) -> np.ndarray:
        crop = decode_image(self.source.read(item))
        if size is not None and crop.shape[:2] != tuple(size):
            raise ImageDecodeError(f"crop is {crop.shape[0]}x{crop.shape[1]}, model expects {size[0]}x{size[1]}")
        return crop

    def embed_items(self, items: Sequence[Item]) -> EmbeddedBatch:
        size = getattr(getattr(self.embedder, "config", None), "input_size", None)
        crops, good, status, reason = [], [], [], []
        for i, item in enumerate(items):
            try:
                crops.append(self._read(item, size))
            except ImageDecodeError as exc:
                status.append("error")
                reason.append(str(exc))
                continue
            except (OSError, KeyError, ValueError, RecordIOError) as exc:
                status.append("error")
                reason.append(f"cannot read: {exc}")
                continue
            good.append(i)
            status.append("ok")
            reason.append("")
        embeddings, norms, sharpness = embed_crops(self.embedder, self.spec, crops, len(items), good)
        return EmbeddedBatch(embeddings, norms, status, reason, sharpness)

    def embed_paths(self, rel_paths: Sequence[str]) -> EmbeddedBatch:
        """Crops of a folder source by relative path (query folders)."""
        root = Path(getattr(self.source, "root"))
        return self.embed_items([Item(i, rel, str(root / rel)) for i, rel in enumerate(rel_paths)])

    def __call__(self, batch: Sequence[Item]) -> pa.Table:
        result = self.embed_items(batch)
        return results_table([item.key for item in batch], result, self.spec.dtype)


def detection_columns(sources: Sequence[str], faces: Sequence[Face | None]) -> dict[str, list[Any]]:
    """The ``DETECTION_FIELDS`` of rows from photos ``sources`` and their faces (original pixels; None where a
    photo gave none): box, landmarks and facepipe.quality's inter-ocular distance and yaw (NaN without a face)."""
    landmarks = np.stack([np.full((5, 2), np.nan) if f is None else np.asarray(f.landmarks, np.float64).reshape(5, 2) for f in faces]) \
        if len(faces) else np.zeros((0, 5, 2))
    return {
        "source": list(sources),
        "box": [None if f is None else [float(v) for v in f.box] for f in faces],
        "landmarks": [None if f is None else row.tolist() for f, row in zip(faces, landmarks)],
        "inter_ocular": inter_ocular_distance(landmarks).tolist(),
        "yaw": landmark_yaw(landmarks).tolist(),
    }


def embedding_column(embeddings: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(embeddings, dtype=np.dtype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def results_table(
    paths: Sequence[str], batch: EmbeddedBatch, dtype: str, det_scores: Sequence[float] | None = None,
    detection: dict[str, list[Any]] | None = None,
) -> pa.Table:
    """One batch's result rows in ``result_schema`` (``detection``: the columns of ``DETECTION_FIELDS``)."""
    n = len(paths)
    columns: dict[str, Any] = {
        "path": list(paths),
        "embedding": embedding_column(batch.embeddings.reshape(n, -1), dtype),
        "norm": batch.norms.astype(np.float32),
        "det_score": [float("nan")] * n if det_scores is None else list(det_scores),
        "sharpness": np.full(n, np.nan, np.float32) if batch.sharpness is None else batch.sharpness.astype(np.float32),
        "status": list(batch.status),
        "reason": list(batch.reason),
        **(detection or {}),
    }
    return pa.table(columns, schema=result_schema(batch.embeddings.shape[1], dtype, detection is not None))


def embeddings_of(results: pa.Table) -> np.ndarray:
    """The ``(N, D)`` matrix of a result table's embedding column (its own dtype)."""
    column = results.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), dim)


# ---------------------------------------------------------------------------------------------- the store


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


class EmbeddingStore:
    """Writer side of an embedding folder: the run's ``RunState`` (settings, shard markers, lock) plus the
    shards' matrices."""

    def __init__(self, out_dir: str | os.PathLike, detection: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.shards_dir = self.out_dir / SHARDS_DIR
        self.schema = manifest_schema(detection)
        self.state = RunState(self.out_dir / RUN_FILE, self.shards_dir, SHARD_PREFIX)

    def npy_path(self, shard: int) -> Path:
        return self.shards_dir / f"{SHARD_PREFIX}-{shard:06d}.npy"

    def start(self, settings: dict[str, Any], overwrite: bool = False) -> None:
        """Lock the folder, then resume (same settings), refuse (others), or start over (``overwrite`` deletes the
        old shards and manifest)."""
        try:
            self.state.start(settings, overwrite=overwrite, discard=self._discard)
        except RunStateError as exc:
            self.state.close()
            raise EmbeddingStoreError(str(exc)) from None
        if overwrite:
            (self.out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        done = set(self.state.done_parts())
        for matrix in self.shards_dir.glob(f"{SHARD_PREFIX}-*.npy"):  # a kill between a matrix and its marker
            if not matrix.stem.split("-")[-1].isdigit() or int(matrix.stem.split("-")[-1]) not in done:
                matrix.unlink(missing_ok=True)

    def _discard(self, old_rows: pa.Table) -> None:
        for shard in set(old_rows.column("shard").to_pylist()):
            self.npy_path(int(shard)).unlink(missing_ok=True)

    def done_shards(self) -> set[int]:
        return set(self.state.done_parts())

    def done_keys(self, key_column: str = "path") -> set[str]:
        return self.state.done_keys(key_column, self.schema)

    def free_shards(self, count: int) -> list[int]:
        """``count`` shard ids no committed shard uses, lowest first: a resumed run refills the ids of the
        shards a kill lost, so it ends with the files an uninterrupted run writes."""
        done, free, candidate = self.done_shards(), [], 0
        while len(free) < count:
            if candidate not in done:
                free.append(candidate)
            candidate += 1
        return free

    def commit_shard(self, shard: int, embeddings: np.ndarray, rows: pa.Table) -> None:
        if len(embeddings) != rows.num_rows:
            raise ValueError(f"shard {shard}: {len(embeddings)} embeddings for {rows.num_rows} manifest rows")
        _save_npy(self.npy_path(shard), embeddings)  # the matrix first: a committed part implies its matrix
        self.state.commit_part(shard, rows.cast(self.schema))

    def merge(self, keep_keys: Collection[str] | None = None, key_column: str = "path") -> pa.Table:
        """The committed rows whose key is still an input (all when ``keep_keys`` is None), sorted by key (then
        shard and row: a photo's faces in order), numbered, written atomically to ``manifest.parquet``."""
        table = self.state.read_parts(self.schema)
        if keep_keys is not None:
            wanted = pa.array(sorted(keep_keys), pa.string())
            table = table.filter(pc.is_in(table.column(key_column), value_set=wanted))
        table = table.sort_by([(key_column, "ascending"), ("shard", "ascending"), ("row", "ascending")])
        table = table.set_column(0, "index", pa.array(np.arange(table.num_rows, dtype=np.int64)))
        write_table_atomic(table, self.out_dir / MANIFEST_NAME)
        return table

    def close(self) -> None:
        self.state.close()

    def abandon(self) -> None:
        """Release the folder; a run that committed nothing leaves nothing behind."""
        self.state.abandon()


def shard_rows(
    shard: int, first_index: int, rel_paths: Sequence[str], batch: EmbeddedBatch, det_scores: dict[str, float]
) -> pa.Table:
    """A shard's manifest rows for crops ``rel_paths`` (``index`` from ``first_index``; the merge renumbers)."""
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
            "sharpness": [float("nan")] * n if batch.sharpness is None else batch.sharpness.tolist(),
            "status": batch.status,
            "reason": batch.reason,
        },
        schema=MANIFEST_SCHEMA,
    )


def rows_of_results(shard: int, results: pa.Table, schema: pa.Schema) -> pa.Table:
    """A shard's manifest rows from its workers' result rows (the columns the job assigns added)."""
    n = results.num_rows
    paths = results.column("path").to_pylist()
    assigned = {
        "index": pa.array(np.full(n, -1, dtype=np.int64)),
        "shard": pa.array(np.full(n, shard, dtype=np.int32)),
        "row": pa.array(np.arange(n, dtype=np.int32)),
        "identity": pa.array([identity_of(p) for p in paths], pa.string()),
    }
    return pa.table({f.name: assigned[f.name] if f.name in assigned else results.column(f.name) for f in schema}, schema=schema)


# ---------------------------------------------------------------------------------------------- the job


@dataclass
class EmbedSummary:
    total: int  # inputs in the merged manifest (crops; photos with --detect)
    embedded: int  # inputs computed by this run (the rest were in finished shards)
    errors: int
    seconds: float
    out_dir: Path
    removed: int = 0  # inputs of finished shards that are no longer inputs (left out of the manifest)
    faces: int | None = None  # --detect: faces embedded (ok rows)
    no_face: int = 0

    def format(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        noun = "crops" if self.faces is None else "photos"
        text = f"{self.total} {noun}: {self.embedded} embedded now ({rate:.1f} {noun}/s), {self.total - self.embedded} from finished shards"
        if self.removed:
            text += f", {self.removed} no longer inputs (left out)"
        if self.faces is not None:
            text += f", {self.faces} faces, {self.no_face} without a face"
        return f"{text}, {self.errors} unreadable; {self.out_dir / MANIFEST_NAME}"


class EmbedJob:
    """The embed run (see the module docstring): pending inputs grouped into shards of ``shard_size`` inputs and
    batches of ``batch_size``. A context manager: leaving it on an error releases the folder (and removes a run
    that committed nothing)."""

    name = "embed"

    def __init__(
        self,
        source: Source,
        out_dir: str | os.PathLike,
        worker: Any,
        settings: dict[str, Any],
        shard_size: int = 50_000,
        batch_size: int = 64,
        overwrite: bool = False,
        detection: bool = False,
        det_scores: dict[str, float] | None = None,
        items: Sequence[Item] | None = None,
    ) -> None:
        if shard_size < 1 or batch_size < 1:
            raise ValueError("shard_size and batch_size must be at least 1")
        self.started = time.perf_counter()
        items = source.items() if items is None else items  # (a caller that listed them already passes them)
        if not items:
            raise EmbeddingStoreError(f"no image files under {source.description}")
        self.keys = {item.key for item in items}
        self.key_column = "source" if detection else "path"
        self.detection = detection
        self.det_scores = det_scores or {}
        self._worker = worker
        self.device = worker.device
        self.dim = worker.embedding_size  # builds the model here: bad weights fail before the folder is touched
        self.dtype = worker.spec.dtype
        self.store = EmbeddingStore(out_dir, detection)
        self.store.start({**settings, "embedding_size": self.dim}, overwrite=overwrite)
        try:
            done = self.store.done_keys(self.key_column)
        except RunStateError as exc:  # a corrupt shard marker: say which, release the folder
            self.store.abandon()
            raise EmbeddingStoreError(str(exc)) from None
        self.removed = len(done - self.keys)
        pending = [item for item in items if item.key not in done]
        chunks = [pending[start : start + shard_size] for start in range(0, len(pending), shard_size)]
        self.units = [
            Unit(shard, tuple(tuple(chunk[b : b + batch_size]) for b in range(0, len(chunk), batch_size)), len(chunk))
            for shard, chunk in zip(self.store.free_shards(len(chunks)), chunks)
        ]
        self.embedded = 0

    def __enter__(self) -> "EmbedJob":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.store.abandon()
        else:
            self.store.close()

    def pending(self) -> list[Unit]:
        return list(self.units)

    def worker(self, device: str | None = None) -> Any:
        if device is None or device == self._worker.device:
            return self._worker
        return self._worker.for_device(device)

    def failed(self, batch: Sequence[Item], reason: str) -> pa.Table:
        n = len(batch)
        empty = EmbeddedBatch(np.zeros((n, self.dim), self.dtype), np.zeros(n, np.float32), ["error"] * n, [reason] * n)
        detection = detection_columns([item.key for item in batch], [None] * n) if self.detection else None
        return results_table([item.key for item in batch], empty, self.dtype, detection=detection)

    def commit(self, unit: Unit, results: Sequence[pa.Table]) -> None:
        table = pa.concat_tables(results)
        if not self.detection:  # carry the align manifest's detector scores by crop name
            scores = [self.det_scores.get(p, float("nan")) for p in table.column("path").to_pylist()]
            table = table.set_column(table.schema.get_field_index("det_score"), "det_score", pa.array(scores, pa.float32()))
        self.store.commit_shard(unit.id, embeddings_of(table), rows_of_results(unit.id, table, self.store.schema))
        self.embedded += unit.items

    def finish(self) -> EmbedSummary:
        table = self.store.merge(keep_keys=self.keys, key_column=self.key_column)
        self.store.close()
        status = table.column("status")
        errors = int(pc.sum(pc.equal(status, "error")).as_py() or 0)
        summary = EmbedSummary(len(self.keys), self.embedded, errors, time.perf_counter() - self.started, self.store.out_dir, self.removed)
        if self.detection:
            summary.faces = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
            summary.no_face = int(pc.sum(pc.equal(status, "no_face")).as_py() or 0)
            summary.errors = len(set(table.filter(pc.equal(status, "error")).column("source").to_pylist()))
        return summary


def run_settings(spec: EmbedSpec, input_path: str | os.PathLike) -> dict[str, Any]:
    """What decides the stored numbers; the input folder is one (the list of its files is not)."""
    return {**asdict(spec), "input": str(Path(input_path).resolve())}


def read_align_scores(aligned_dir: Path, source: Source, keys: Sequence[str]) -> dict[str, float]:
    """``crop key -> detector score`` from the align manifest beside the crops; for a RecordIO, whose records
    are the crops in the manifest's order, the k-th record gets the k-th score. Empty without an align manifest."""
    from facepipe.pipeline.manifest import read_detector_scores

    path = (aligned_dir.parent if aligned_dir.is_file() else aligned_dir) / ALIGN_MANIFEST_NAME
    try:
        scores = read_detector_scores(path)
    except (OSError, KeyError, pa.ArrowException):
        return {}  # no align manifest (crops from elsewhere): no scores to carry
    if isinstance(source, RecordIOSource):
        return dict(zip(keys, scores.values())) if len(keys) == len(scores) else {}
    return scores


def embed_directory_job(
    aligned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: EmbedSpec,
    device: str = "cpu",
    batch_size: int = 64,
    shard_size: int = 50_000,
    threads: int | None = None,
    overwrite: bool = False,
) -> EmbedJob:
    """The started embed run over every crop at ``aligned_dir`` (any layout ``open_crops`` reads), for an engine to
    run (``facepipe.engine.run_job``): it resumes a run with the same settings, embedding only the crops no
    finished shard holds."""
    aligned_dir = Path(aligned_dir)
    try:
        source = open_crops(aligned_dir)
    except CropFolderError as exc:
        raise EmbeddingStoreError(str(exc)) from None
    items = source.items()
    worker = CropEmbedder(reader_only(source), spec, device=device, batch_size=batch_size, threads=threads)
    scores = read_align_scores(aligned_dir, source, [item.key for item in items])
    settings = run_settings(spec, aligned_dir)
    return EmbedJob(source, out_dir, worker, settings, shard_size, batch_size, overwrite, det_scores=scores, items=items)


def embed_directory(
    aligned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: EmbedSpec,
    *,
    progress: bool = True,
    engine: str = "local",
    workers: int | None = 0,
    options: Any = None,
    **job_options: Any,
) -> EmbedSummary:
    """``embed_directory_job(aligned_dir, out_dir, spec, **job_options)`` run to the end on an engine (see
    ``facepipe.engine.run_job`` for ``engine``, ``workers``, ``options``); a convenience for scripts and tests."""
    from facepipe.engine.local import run_job

    with embed_directory_job(aligned_dir, out_dir, spec, **job_options) as job:
        return run_job(job, engine=engine, workers=workers, progress=progress, options=options)


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(emb_dir: str | os.PathLike) -> pd.DataFrame:
    """The merged manifest (with the detection columns when the run had them)."""
    emb_dir = Path(emb_dir)
    path = emb_dir / MANIFEST_NAME
    if not path.is_file():
        raise EmbeddingStoreError(f"{emb_dir} has no {MANIFEST_NAME}: not an embedding folder, or the run did not finish")
    try:
        columns = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise EmbeddingStoreError(f"{path}: not a readable manifest ({exc})") from None
    schema = manifest_schema(all(f.name in columns for f in DETECTION_FIELDS if f.name not in QUALITY_COLUMNS))
    missing = [name for name in schema.names if name not in columns]
    if set(missing) - set(QUALITY_COLUMNS):
        raise EmbeddingStoreError(f"{path}: not an embedding manifest (no {', '.join(missing)} column)")
    table = pq.read_table(path, columns=[name for name in schema.names if name in columns])
    for name in missing:  # folders embedded before the quality measures were stored: unknown, not lost
        table = table.append_column(name, pa.nulls(table.num_rows, pa.float32()))
    return table.select(schema.names).cast(schema).to_pandas()


def _shard_matrix(emb_dir: Path, shard: int, mmap: bool) -> np.ndarray:
    path = emb_dir / SHARDS_DIR / f"{SHARD_PREFIX}-{shard:06d}.npy"
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise EmbeddingStoreError(f"{emb_dir}: shard {shard} is unreadable ({exc})") from None


def iter_shards(
    emb_dir: str | os.PathLike, mmap: bool = True, manifest: pd.DataFrame | None = None
) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """``(matrix, manifest rows)`` shard by shard, matrix row i = rows' row i (taken by ``row``; a shard all of whose
    rows are listed, in order, comes memory-mapped): galleries far larger than memory stream through this.
    ``manifest``: the folder's manifest when the caller has read it already."""
    emb_dir = Path(emb_dir)
    manifest = read_manifest(emb_dir) if manifest is None else manifest
    for shard, rows in manifest.groupby("shard", sort=True):
        matrix = _shard_matrix(emb_dir, int(shard), mmap)
        take = rows["row"].to_numpy()
        if len(take) and (take.min() < 0 or take.max() >= len(matrix)):
            raise EmbeddingStoreError(f"{emb_dir}: shard {shard} holds {len(matrix)} rows, the manifest names row {take.max()}")
        if not (len(take) == len(matrix) and (take == np.arange(len(matrix))).all()):
            matrix = np.asarray(matrix[take])
        yield matrix, rows.reset_index(drop=True)


def load_embeddings(emb_dir: str | os.PathLike, mmap: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """The manifest and its matrix, row i of the matrix = manifest row i (memory-mapped when one whole shard
    holds them all, in order)."""
    emb_dir = Path(emb_dir)
    manifest = read_manifest(emb_dir)
    shards = list(iter_shards(emb_dir, mmap=mmap, manifest=manifest))
    if not shards:
        run = json.loads((emb_dir / RUN_FILE).read_text()) if (emb_dir / RUN_FILE).is_file() else {}
        return np.zeros((0, int(run.get("embedding_size", 0))), dtype=np.float32), manifest
    if len(shards) == 1 and (shards[0][1]["index"].to_numpy() == np.arange(len(manifest))).all():
        return shards[0][0], manifest
    first = shards[0][0]
    matrix = np.empty((len(manifest), first.shape[1]), dtype=first.dtype)
    for part, rows in shards:
        matrix[rows["index"].to_numpy()] = part
    return matrix, manifest

