"""Ray Data engine: the align, embed and IJB-C feature jobs of the local engines, run on a Ray cluster.

What Ray replaces is only *how batches get processed*. The driver plans exactly as the local engine does
(``AlignRun`` for align, the ``EmbeddingStore`` shards for embed, the ``FeatureCache`` shards for IJB-C), turns
every pending batch into a small descriptor row (item keys and paths, never pixels: the driver stays light and
the object store carries kilobytes), and maps a callable class over them with an actor pool (one model load per
actor, GPU actors when asked). Each actor reads and decodes its own inputs, so the inputs must be reachable
from every node (a shared file system, as for any Ray Data job). Results (encoded crops, manifest rows,
embeddings) flow back to the driver, which commits them through the local engine's own writers, chunk by
chunk: the same names, bytes and manifests as the local engine, the same atomic writes, the same resume.
Batches are the local engine's batches (same boundaries), so even batch-dependent numerics match.

Why the driver writes, not the actors: one writer keeps the commit protocol (outputs first, then the manifest
part) and the RecordIO merge exactly as tested locally, and needs no shared writable file system. The cost is
the crops' bytes through the driver: ~5 kB per 112x112 JPEG, so 10,000 images/s is ~50 MB/s, far below what
one driver can write.

Fault tolerance: actors are restarted (``max_restarts``) and their failed batches retried
(``max_task_retries``) by Ray; a bad image never fails a batch (it is an ``error`` row, as locally). A batch that
keeps failing ends the job after the retries, leaving every committed chunk in place for the rerun.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

RAY_INSTALL_HINT = "the Ray engine needs Ray Data: pip install 'facepipe[ray]'"
ENGINES = ("local", "ray")


class RayEngineError(RuntimeError):
    """The Ray engine cannot run: Ray is missing, the cluster unreachable, or the cluster lacks what was asked."""


class RayUnavailableError(RayEngineError):
    """Ray (with Ray Data) is not installed."""


def import_ray() -> Any:
    """``ray`` with ``ray.data`` imported, or a ``RayUnavailableError`` that says what to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray Core
    except ImportError as exc:
        raise RayUnavailableError(f"{RAY_INSTALL_HINT} ({exc})") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How the job runs on Ray (never what it outputs).

    ``address``: ``None`` joins the cluster named by ``RAY_ADDRESS`` or else starts a local one; ``"auto"`` an
    existing local cluster (``ray start --head``); ``"ray://host:10001"`` a remote one.
    ``num_gpus``: GPUs per model actor; fractions share a GPU (0.5 = two actors per GPU, so one decodes while
    the other runs the network). ``None``: 0.5 when the cluster has GPUs, else CPU actors.
    ``actors``: pool size; default: every GPU share, or on CPUs one actor per ``num_cpus`` cores minus one core
    for Ray Data's own tasks (on 2 cores, two 1-CPU actors starve the upstream stage and hang).
    """

    address: str | None = None
    actors: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    max_restarts: int = 3
    max_task_retries: int = 3

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError("the Ray actor pool needs at least 1 actor (--workers)")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError("--num-gpus must be 0 or more")
        if self.num_cpus <= 0:
            raise ValueError("CPUs per actor must be positive")


@dataclass(frozen=True)
class _Resolved:
    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    threads: int


def init_ray(options: RayOptions) -> Any:
    """Connect to (or start) the cluster unless this process is already connected."""
    ray = import_ray()
    if not ray.is_initialized():
        check_address(options.address)
        try:
            ray.init(address=options.address, include_dashboard=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = options.address or os.environ.get("RAY_ADDRESS") or "a new local cluster"
            raise RayEngineError(f"cannot start or join the Ray cluster ({where}): {exc}") from None
    return ray


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail in seconds on a wrong ``HOST:PORT`` (Ray itself keeps retrying for minutes)."""
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise RayEngineError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayEngineError(f"no Ray cluster answers at {address} ({exc}); start one with `ray start --head`") from None


def resolve_actors(resources: dict[str, float], options: RayOptions) -> _Resolved:
    """Pool size, per-actor resources, device and thread count from the cluster's ``ray.cluster_resources()``."""
    cluster_gpus = float(resources.get("GPU", 0.0))
    cluster_cpus = float(resources.get("CPU", 1.0))
    num_gpus = options.num_gpus if options.num_gpus is not None else (0.5 if cluster_gpus > 0 else 0.0)
    if num_gpus > 0 and cluster_gpus == 0:
        raise RayEngineError(f"--num-gpus {num_gpus:g} asks for GPU actors, but the Ray cluster has no GPUs")
    if options.actors is not None:
        actors = options.actors
    elif num_gpus > 0:
        actors = max(1, int(cluster_gpus / num_gpus))
    else:
        actors = max(1, int((cluster_cpus - 1) // options.num_cpus))
    return _Resolved(actors, num_gpus, options.num_cpus, "cuda" if num_gpus > 0 else "cpu", max(1, int(options.num_cpus)))


def _limit_threads(threads: int) -> None:
    """An actor's thread budget is its CPU share: Ray packs actors by ``num_cpus``, torch would take every core."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(threads)


def _stream(
    descriptors: list[dict[str, Any]],
    actor_class: type,
    constructor_args: tuple,
    resolved: _Resolved,
    options: RayOptions,
    on_batch: Callable[[int, pa.Table], None],
) -> None:
    """Map ``actor_class`` over the descriptor rows (one per local batch, each with ``batch`` id and ``n``
    inputs) and hand each batch's output rows to ``on_batch`` once all ``n`` have arrived."""
    ray = import_ray()
    import ray.data

    if not descriptors:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one tqdm bar over the inputs, as the local engine
    expected = {int(d["batch"]): int(d["n"]) for d in descriptors}
    dataset = ray.data.from_items(descriptors)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_restarts / max_task_retries through **ray_remote_args but has no named
        # parameter for them yet; its defaults (-1, -1) would retry a crashing batch forever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
        dataset = dataset.map_batches(
            actor_class,
            fn_constructor_args=constructor_args,
            batch_size=1,  # one descriptor = one local batch: same batch boundaries as the local engine
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resolved.actors),
            num_cpus=resolved.num_cpus,
            num_gpus=resolved.num_gpus or None,
            max_restarts=options.max_restarts,
            max_task_retries=options.max_task_retries,
        )
    partial: dict[int, list[pa.Table]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        batch_ids = block.column("batch").to_numpy()
        for batch_id in dict.fromkeys(batch_ids.tolist()):
            rows = block.filter(pa.array(batch_ids == batch_id))
            partial[batch_id].append(rows)
            received[batch_id] += rows.num_rows
            if received[batch_id] == expected[batch_id]:
                on_batch(batch_id, pa.concat_tables(partial.pop(batch_id)))
            elif received[batch_id] > expected[batch_id]:
                raise RuntimeError(f"batch {batch_id}: {received[batch_id]} results for {expected[batch_id]} inputs")
    missing = [b for b, n in expected.items() if received.get(b, 0) != n]
    if missing:
        raise RuntimeError(f"the Ray job ended with {len(missing)} batches incomplete (first: {missing[:5]})")


# ---------------------------------------------------------------------------------------------------- align

ALIGN_RESULT_SCHEMA = pa.schema([("batch", pa.int64()), ("row", pa.string()), ("crops", pa.list_(pa.binary()))])


class AlignActor:
    """Ray actor: one ``AlignWorker`` (detector loaded once) applied to descriptor rows of items."""

    def __init__(self, config: Any, source: Any, threads: int) -> None:
        from facepipe.pipeline.align import AlignWorker

        _limit_threads(threads)
        self.worker = AlignWorker(config, source)
        self.worker.prepare()

    def __call__(self, batch: pa.Table) -> pa.Table:
        import json
        from dataclasses import asdict

        from facepipe.pipeline.sources import Item

        out: dict[str, list] = {"batch": [], "row": [], "crops": []}
        for descriptor in batch.to_pylist():
            items = [
                Item(index, key, source, label)
                for index, key, source, label in zip(descriptor["index"], descriptor["key"], descriptor["source"], descriptor["label"])
            ]
            for result in self.worker.process(items):
                out["batch"].append(descriptor["batch"])
                out["row"].append(json.dumps(asdict(result.row)))
                out["crops"].append(result.crops)
        return pa.Table.from_pydict(out, schema=ALIGN_RESULT_SCHEMA)


def _reader_only(source: Any) -> Any:
    """What actors need of the source: ``read(item)``. A file source's ``read`` uses only the item's path, so its
    list of every input path (hundreds of MB for millions of images) stays in the driver."""
    from facepipe.pipeline.sources import FileSource

    if isinstance(source, FileSource):
        return FileSource([], source.root, source.description)
    return source


def run_align_ray(
    config: Any,
    source: Any,
    out_dir: str | os.PathLike,
    options: RayOptions = RayOptions(),
    sink_kind: str = "dir",
    manifest_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    chunk_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """``run_align`` on Ray: same arguments (``options`` instead of ``workers``), same outputs and manifest,
    same resume; returns the local engine's ``AlignSummary``."""
    import json

    from tqdm import tqdm

    from facepipe.pipeline.align import AlignRun, AlignSummary, AlignWorker, ItemResult, _ChunkCollector
    from facepipe.pipeline.manifest import ManifestRow

    started = time.perf_counter()
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    ray = init_ray(options)
    run = AlignRun(config, source, out_dir, sink_kind, manifest_path, chunk_size, overwrite)
    if run.pending:
        # Load the detector (or landmarks file) here first, on CPU: bad weights fail now with the local engine's
        # error instead of as actor deaths on the cluster.
        AlignWorker(replace(config, device="cpu"), source).prepare()
        resolved = resolve_actors(ray.cluster_resources(), options)
        actor_config = replace(config, device=resolved.device)
        batches = [
            (chunk_id, run.chunks[chunk_id][start : start + batch_size])
            for chunk_id in run.pending
            for start in range(0, len(run.chunks[chunk_id]), batch_size)
        ]
        descriptors = [
            {
                "batch": b,
                "n": len(items),
                "index": [item.index for item in items],
                "key": [item.key for item in items],
                "source": [item.source for item in items],
                "label": [item.label for item in items],
            }
            for b, (_, items) in enumerate(batches)
        ]
        with tqdm(total=sum(len(items) for _, items in batches), unit="img", disable=not progress, dynamic_ncols=True) as bar:
            collector = _ChunkCollector(run, batches, bar)

            def commit(batch_id: int, rows: pa.Table) -> None:
                results = [
                    ItemResult(ManifestRow(**json.loads(row)), list(crops))
                    for row, crops in zip(rows.column("row").to_pylist(), rows.column("crops").to_pylist())
                ]
                collector.add(batches[batch_id][0], results)

            _stream(descriptors, AlignActor, (actor_config, _reader_only(source), resolved.threads), resolved, options, commit)
    counts = run.finish()
    processed = len(run.items) - run.skipped
    return AlignSummary(counts, processed, run.skipped, run.crops_written, time.perf_counter() - started, run.manifest_path)


# ---------------------------------------------------------------------------------------------------- embed


class EmbedActor:
    """Ray actor: one ``CropEmbedder`` (model loaded once) applied to descriptor rows of crop paths."""

    def __init__(self, root: str, spec: Any, device: str, batch_size: int, threads: int) -> None:
        from facepipe.embedding.store import CropEmbedder

        _limit_threads(threads)
        self.embedder = CropEmbedder(root, spec, device=device, batch_size=batch_size, threads=threads)
        _ = self.embedder.embedder

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for descriptor in batch.to_pylist():
            result = self.embedder.embed_paths(descriptor["paths"])
            n, dim = result.embeddings.shape
            flat = pa.array(result.embeddings.reshape(-1))
            tables.append(
                pa.table(
                    {
                        "batch": pa.array([descriptor["batch"]] * n, pa.int64()),
                        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
                        "norm": pa.array(result.norms, pa.float32()),
                        "status": pa.array(result.status, pa.string()),
                        "reason": pa.array(result.reason, pa.string()),
                    }
                )
            )
        return pa.concat_tables(tables)


def _gather_shards(
    shard_of_batch: Sequence[int], on_shard: Callable[[int, pa.Table], None], bar: Any
) -> Callable[[int, pa.Table], None]:
    """A per-batch callback that buffers batch rows and calls ``on_shard(shard, rows)`` once every batch of that
    shard has arrived, with the rows in batch order (batches finish in any order on Ray)."""
    remaining: dict[int, int] = defaultdict(int)
    for shard in shard_of_batch:
        remaining[shard] += 1
    pending: dict[int, dict[int, pa.Table]] = defaultdict(dict)

    def on_batch(batch_id: int, rows: pa.Table) -> None:
        shard = shard_of_batch[batch_id]
        pending[shard][batch_id] = rows
        bar.update(rows.num_rows)
        remaining[shard] -= 1
        if not remaining[shard]:
            parts = pending.pop(shard)
            on_shard(shard, pa.concat_tables([parts[b] for b in sorted(parts)]))

    return on_batch


def embed_directory_ray(
    aligned_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: Any,
    options: RayOptions = RayOptions(),
    batch_size: int = 64,
    shard_size: int = 50_000,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """``embed_directory`` on Ray: same shards, manifest and ``run.json``, same resume; returns ``EmbedSummary``."""
    from tqdm import tqdm

    from facepipe.embedding.store import (
        CropEmbedder,
        EmbeddedBatch,
        EmbedSummary,
        crops_to_embed,
        open_embedding_run,
        shard_rows,
    )

    started = time.perf_counter()
    rel_paths = crops_to_embed(aligned_dir, shard_size)
    ray = init_ray(options)
    # The model is built once here on CPU: its embedding size goes into run.json, and bad weights fail now.
    embedding_size = CropEmbedder(aligned_dir, spec, device="cpu", batch_size=batch_size).embedding_size
    store, det_scores, unfinished = open_embedding_run(
        aligned_dir, out_dir, spec, rel_paths, shard_size, embedding_size, overwrite
    )
    todo = dict(unfinished)
    batches = [
        (shard, paths[b : b + batch_size]) for shard, paths in todo.items() for b in range(0, len(paths), batch_size)
    ]
    if batches:
        resolved = resolve_actors(ray.cluster_resources(), options)
        descriptors = [{"batch": b, "n": len(paths), "paths": paths} for b, (_, paths) in enumerate(batches)]
        dtype = np.dtype(spec.dtype)
        with tqdm(total=sum(len(p) for p in todo.values()), unit="crop", desc="embed", disable=not progress) as bar:

            def commit_shard(shard: int, table: pa.Table) -> None:
                embeddings = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=dtype)
                merged = EmbeddedBatch(
                    embeddings.reshape(table.num_rows, embedding_size),
                    table.column("norm").to_numpy().astype(np.float32),
                    table.column("status").to_pylist(),
                    table.column("reason").to_pylist(),
                )
                paths = todo[shard]
                store.commit_shard(shard, merged.embeddings, shard_rows(shard, shard * shard_size, paths, merged, det_scores))

            constructor_args = (str(aligned_dir), spec, resolved.device, batch_size, resolved.threads)
            on_batch = _gather_shards([shard for shard, _ in batches], commit_shard, bar)
            _stream(descriptors, EmbedActor, constructor_args, resolved, options, on_batch)
    table = store.merge()
    errors = int(sum(status == "error" for status in table.column("status").to_pylist()))
    embedded = sum(len(p) for p in todo.values())
    return EmbedSummary(len(rel_paths), embedded, errors, time.perf_counter() - started, Path(out_dir))


# ---------------------------------------------------------------------------------------------------- IJB-C


class IJBFeatureActor:
    """Ray actor: an IJB-C ``FeatureExtractor`` (models loaded once) applied to descriptor rows of images."""

    def __init__(self, extractor: Callable[[dict], dict], threads: int) -> None:
        _limit_threads(threads)
        self.extractor = extractor

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for descriptor in batch.to_pylist():
            n = descriptor["n"]
            out = self.extractor(
                {
                    "path": np.array(descriptor["path"], dtype=object),
                    "landmarks": np.asarray(descriptor["landmarks"], dtype=np.float32).reshape(n, 5, 2),
                    "faceness": np.asarray(descriptor["faceness"], dtype=np.float32),
                }
            )
            features = np.ascontiguousarray(out["features"], dtype=np.float32)
            tables.append(
                pa.table(
                    {
                        "batch": pa.array([descriptor["batch"]] * n, pa.int64()),
                        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features[0].size if n else 0),
                        "score": pa.array(np.asarray(out["score"], dtype=np.float32)),
                        "flag": pa.array(np.asarray(out["flag"], dtype=np.uint8)),
                    }
                )
            )
        return pa.concat_tables(tables)


def extract_ijb_features_ray(
    layout: Any,
    cache: Any,
    extractor: Callable[[dict], dict],
    batch_size: int = 64,
    options: RayOptions | None = None,
    progress: bool = True,
) -> Any:
    """Fill the missing shards of an IJB-C ``FeatureCache`` with one Ray job over all of them; each shard is
    written (atomically, by the cache) as soon as its last batch is back, so an interrupted run resumes."""
    from tqdm import tqdm

    options = options or RayOptions()
    ray = init_ray(options)
    missing = cache.missing_shards()
    if not missing:
        return cache
    resolved = resolve_actors(ray.cluster_resources(), options)
    if hasattr(extractor, "device") and hasattr(extractor, "models"):  # a FeatureExtractor: run it where the actor is
        extractor = replace(extractor, device=resolved.device)
    batches = [
        (shard, s, min(s + batch_size, cache.shard_range(shard)[1]))
        for shard in missing
        for s in range(cache.shard_range(shard)[0], cache.shard_range(shard)[1], batch_size)
    ]
    descriptors = [
        {
            "batch": b,
            "n": stop - start,
            "path": list(layout.image_paths(start, stop)),
            "landmarks": np.asarray(layout.landmarks[start:stop], dtype=np.float32).reshape(-1).tolist(),
            "faceness": np.asarray(layout.faceness[start:stop], dtype=np.float32).tolist(),
        }
        for b, (_, start, stop) in enumerate(batches)
    ]
    done = cache.num_images - sum(cache.shard_range(k)[1] - cache.shard_range(k)[0] for k in missing)
    with tqdm(total=cache.num_images, initial=done, unit="img", desc=f"{layout.target} features", disable=not progress) as bar:

        def commit_shard(shard: int, table: pa.Table) -> None:
            features = table.column("features").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            cache.write_shard(
                shard,
                np.asarray(features, dtype=np.float32).reshape(table.num_rows, 2, -1),
                table.column("score").to_numpy(),
                table.column("flag").to_numpy(),
            )

        on_batch = _gather_shards([shard for shard, _, _ in batches], commit_shard, bar)
        _stream(descriptors, IJBFeatureActor, (extractor, resolved.threads), resolved, options, on_batch)
    return cache


__all__: Sequence[str] = (
    "RAY_INSTALL_HINT",
    "RayOptions",
    "RayEngineError",
    "RayUnavailableError",
    "embed_directory_ray",
    "extract_ijb_features_ray",
    "import_ray",
    "init_ray",
    "run_align_ray",
)
