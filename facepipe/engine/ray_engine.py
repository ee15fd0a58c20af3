"""Ray Data engine: runs any ``BatchJob`` (``facepipe.engine.job``: align, embed, IJB-C features) on a Ray cluster.

What Ray replaces is only *how batches get processed*. The driver plans exactly as the local engine does (the
job's ``pending()`` units and their batches), pickles every batch into a small descriptor row (item keys and
paths, never pixels: the driver stays light and the object store carries kilobytes), and maps the job's worker
(``job.worker(device)``, built once per actor, on GPU actors when asked) over them with an actor pool. Each actor
reads and decodes its own inputs, so the inputs must be reachable from every node (a shared file system, as for
any Ray Data job). The worker's results come back as Arrow tables (the job's result columns) and the driver
commits them through ``job.commit``, unit by unit, in batch order: the same names, bytes and manifests as the
local engine, the same atomic writes, the same resume. Batches are the local engine's batches (same
boundaries), so even batch-dependent numerics match.

Why the driver writes, not the actors: one writer keeps the commit protocol (outputs first, then the part) and
the RecordIO merge exactly as tested locally, and needs no shared writable file system. The cost is the crops'
bytes through the driver: ~5 kB per 112x112 JPEG, so 10,000 images/s is ~50 MB/s, far below what one driver
can write.

Fault tolerance: when an actor dies (OOM kill, segfault), the pool is started again on the batches not yet back,
up to ``RayOptions.max_restarts`` times (Ray's own actor restarts are off: see ``_stream_once``); a bad image
never fails a batch (it is an ``error`` row, as locally). Every committed unit stays in place for a rerun.
"""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa

from facepipe.engine.job import BatchJob, JobProgress
from facepipe.engine.local import UnitCollector, limit_threads

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
    ``max_restarts``: how many times the actor pool is started again, on the batches not yet back, after an
    actor died.
    """

    address: str | None = None
    actors: int | None = None
    num_gpus: float | None = None
    num_cpus: float = 1.0
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError("the Ray actor pool needs at least 1 actor (--workers)")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError("--num-gpus must be 0 or more")
        if self.num_cpus <= 0:
            raise ValueError("CPUs per actor must be positive")
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be 0 or more")


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


BATCH_COLUMN = "__batch"  # the engine's bookkeeping columns on a worker's result table (dropped before commit)
ROWS_COLUMN = "__rows"


class _BatchActor:
    """Ray actor: one job worker (model built once, on the actor's device) applied to pickled batches; its
    result tables come back as Arrow, with the batch id and the batch's row count added."""

    def __init__(self, worker: Any, threads: int) -> None:
        limit_threads(threads)  # its CPU share: Ray packs actors by num_cpus, torch would take every core
        self.worker = worker
        self.worker.prepare()

    def __call__(self, descriptors: pa.Table) -> pa.Table:
        tables = []
        for batch_id, payload in zip(descriptors.column("batch").to_pylist(), descriptors.column("payload").to_pylist()):
            table = self.worker(pickle.loads(payload))
            n = table.num_rows
            table = table.append_column(BATCH_COLUMN, pa.array([batch_id] * n, pa.int64()))
            tables.append(table.append_column(ROWS_COLUMN, pa.array([n] * n, pa.int64())))
        return pa.concat_tables(tables)


def run_ray(job: BatchJob, options: RayOptions = RayOptions(), progress: bool = True) -> JobProgress:
    """Run every pending unit of ``job`` with an actor pool and commit it in this process, unit by unit, results in
    batch order (``finish`` is the caller's: ``facepipe.engine.local.run_job``)."""
    from tqdm import tqdm

    ray = init_ray(options)
    units = job.pending()
    if not units:
        return JobProgress()
    # Build the model here first, on CPU: bad weights fail now with the local engine's error instead of as actor
    # deaths on the cluster.
    job.worker("cpu").prepare()
    resolved = resolve_actors(ray.cluster_resources(), options)
    with tqdm(total=sum(u.items for u in units), unit="img", desc=job.name, disable=not progress, dynamic_ncols=True) as bar:
        collector = UnitCollector(job, units, bar)
        tasks = list(collector.tasks())
        descriptors = [{"batch": b, "payload": pickle.dumps(task.batch)} for b, task in enumerate(tasks)]
        _stream(descriptors, _BatchActor, (job.worker(resolved.device), resolved.threads), resolved, options,
                lambda batch_id, rows: collector.add(tasks[batch_id], rows))
    return collector.progress


def _stream(
    descriptors: list[dict[str, Any]],
    actor_class: type,
    constructor_args: tuple,
    resolved: _Resolved,
    options: RayOptions,
    on_batch: Callable[[int, pa.Table], None],
) -> None:
    """Map ``actor_class`` over the descriptor rows (one per batch, with its ``batch`` id) and hand each batch's
    result rows (bookkeeping columns dropped) to ``on_batch`` once all of them have arrived. When an actor dies,
    the pool is started again on the batches not yet back, up to ``options.max_restarts`` times."""
    ray = import_ray()
    finished: set[int] = set()
    for restart in range(options.max_restarts + 1):
        todo = [d for d in descriptors if int(d["batch"]) not in finished]
        if not todo:
            return
        try:
            _stream_once(todo, actor_class, constructor_args, resolved, on_batch, finished)
        except ray.exceptions.RayActorError:
            if restart == options.max_restarts:
                raise
    missing = sorted(int(d["batch"]) for d in descriptors if int(d["batch"]) not in finished)
    if missing:
        raise RuntimeError(f"the Ray job ended with {len(missing)} batches incomplete (first: {missing[:5]})")


def _stream_once(
    descriptors: list[dict[str, Any]],
    actor_class: type,
    constructor_args: tuple,
    resolved: _Resolved,
    on_batch: Callable[[int, pa.Table], None],
    finished: set[int],
) -> None:
    """One actor pool over ``descriptors``; adds each batch handed to ``on_batch`` to ``finished``.

    Actors are never restarted by Ray (``max_restarts=0``): Ray Data passes an actor's constructor arguments
    through the object store, and Ray logs an error-level ``core_worker`` line for every such actor that may
    restart (ray-project/ray#53727), on every run, crash or not. ``_stream`` restarts the pool instead.
    """
    ray = import_ray()
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one tqdm bar over the inputs, as the local engine
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_restarts / max_task_retries through **ray_remote_args but has no named
        # parameter for them yet; its defaults (-1, -1) would restart actors (and log the line above).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated", category=DeprecationWarning)
        dataset = ray.data.from_items(descriptors).map_batches(
            actor_class,
            fn_constructor_args=constructor_args,
            batch_size=1,  # one descriptor = one batch: same batch boundaries as the local engine
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resolved.actors),
            num_cpus=resolved.num_cpus,
            num_gpus=resolved.num_gpus or None,
            max_restarts=0,
            max_task_retries=0,
        )
    partial: dict[int, list[pa.Table]] = defaultdict(list)
    received: dict[int, int] = defaultdict(int)
    for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        batch_ids = block.column(BATCH_COLUMN).to_numpy()
        rows_of = block.column(ROWS_COLUMN).to_numpy()
        for batch_id in dict.fromkeys(batch_ids.tolist()):
            mask = batch_ids == batch_id
            rows = block.filter(pa.array(mask))
            expected = int(rows_of[mask][0])
            partial[batch_id].append(rows.drop_columns([BATCH_COLUMN, ROWS_COLUMN]))
            received[batch_id] += rows.num_rows
            if received[batch_id] == expected:
                finished.add(batch_id)
                on_batch(batch_id, pa.concat_tables(partial.pop(batch_id)))
            elif received[batch_id] > expected:
                raise RuntimeError(f"batch {batch_id}: {received[batch_id]} result rows for {expected}")


__all__: Sequence[str] = (
    "RAY_INSTALL_HINT",
    "RayOptions",
    "RayEngineError",
    "RayUnavailableError",
    "import_ray",
    "init_ray",
    "run_ray",
)
