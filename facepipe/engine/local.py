"""The local engine: runs any ``BatchJob`` (``facepipe.engine.job``) on this machine, and ``run_job``, where
commands choose the engine.

**Sizing.** ``workers=None`` gives one process per core on CPU (RetinaFace-mnet and the embedders scale worse
over threads than over processes), each with ``cores // workers`` threads (torch, OpenMP; OpenCV single-threaded)
so that nothing oversubscribes; two processes on a GPU (one decodes and encodes while the other runs the
network). ``workers=0`` runs every batch in this process. Processes come from a forkserver that imported torch
once (a fraction of a spawn's start-up, without fork's OpenMP hazards), or are spawned where there is none.

**Memory bound.** At most 2 batches per worker are in flight, and only from the 2 oldest uncommitted units, so
memory stays bounded however slow one batch is. A unit is committed (``job.commit``) in this process as soon as
its last batch is back, with its results in batch order.

**Interruption.** SIGINT (Ctrl-C) or SIGTERM stops the run between two commits: nothing more is submitted, no
commit is cut in half, the workers are terminated, and ``RunInterrupted`` says how many parts were committed and
that rerunning the same command resumes (commands print it as one line and exit 128 + the signal number).
Workers ignore SIGINT: the parent alone decides, so Ctrl-C in a terminal prints no worker tracebacks.

**Parent death.** However the parent dies (``kill -9`` included), each worker's watcher thread sees the
parent's end of its pipe close and exits the process at once; the forkserver and multiprocessing's resource
tracker exit when their last client is gone. Nothing stays behind holding a model in memory.

**Worker death.** A worker process that dies (the OOM killer's SIGKILL, a segfault in native code) is replaced,
and the batch it was running is retried, up to ``MAX_RETRIES`` times; then the job records the batch's items as
``error`` rows (``job.failed``) and the run goes on. The batch queued behind it is resubmitted without penalty.
Workers that keep dying while loading their model (``MAX_RETRIES`` + 1 times in a row) end the run with one
message: nothing could run without it.

Why not ``concurrent.futures.ProcessPoolExecutor``: one dead worker breaks the whole pool (``BrokenProcessPool``),
and its workers block forever on a queue whose writer a killed parent can no longer close.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow as pa

from facepipe.engine.job import BatchJob, BatchWorker, JobProgress, Unit

MAX_RETRIES = 2  # a batch whose worker died is run at most 1 + MAX_RETRIES times
MAX_IN_FLIGHT_PER_WORKER = 2
OPEN_UNITS = 2  # batches are taken only from this many of the oldest uncommitted units
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run between commits; what is committed stays, a rerun resumes."""

    def __init__(self, signum: int, committed: int, total: int) -> None:
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted ({name}): {committed} of {total} pending parts committed; rerun the same command to resume"
        )


class WorkerSetupError(RuntimeError):
    """A worker process could not build its model (or died while building it)."""


def default_workers(device: str) -> int:
    """One process per core on CPU; two on a GPU (one prepares data while the other runs the network)."""
    cores = max(1, os.cpu_count() or 1)
    return min(2, cores) if device.startswith("cuda") else cores


def limit_threads(threads: int) -> None:
    """This process's thread budget: its share of the cores for torch, onnxruntime (which follows torch's count)
    and OpenMP; OpenCV single-threaded (it runs per image inside batches already spread over processes)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(threads)


def run_job(job: BatchJob, engine: str = "local", workers: int | None = 0, progress: bool = True, **engine_options: Any) -> Any:
    """Run ``job`` on the chosen engine, then ``job.finish()`` (whose value is returned).

    ``workers``: local processes (``None``: ``default_workers(job.device)``; 0: in this process), or the Ray
    actor count when ``options`` (a ``RayOptions``, the Ray engine's only option) does not set one.
    """
    if engine == "local":
        given = [name for name, value in engine_options.items() if value is not None]
        if given:
            raise TypeError(f"the local engine takes no {', '.join(given)}")
        run_local(job, default_workers(job.device) if workers is None else workers, progress)
    elif engine == "ray":
        from dataclasses import replace

        from facepipe.engine.ray_engine import RayOptions, run_ray

        options = engine_options.pop("options", None) or RayOptions()
        if engine_options:
            raise TypeError(f"the Ray engine takes options=RayOptions(...), not {', '.join(engine_options)}")
        if workers and options.actors is None:
            options = replace(options, actors=workers)
        run_ray(job, options, progress)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose local or ray")
    return job.finish()


def run_local(job: BatchJob, workers: int = 0, progress: bool = True) -> JobProgress:
    """Run every pending unit of ``job`` and commit it (``finish`` is the caller's). Raises ``RunInterrupted`` on
    SIGINT/SIGTERM, after terminating the workers; see the module docstring for what each failure does."""
    from tqdm import tqdm

    if workers < 0:
        raise ValueError("workers must be 0 or more")
    with _StopSignals() as stop:
        units = job.pending()
        if not units:
            return JobProgress()
        bar = tqdm(total=sum(u.items for u in units), unit="img", desc=job.name, disable=not progress, dynamic_ncols=True)
        collector = UnitCollector(job, units, bar)
        try:
            if workers == 0:
                _run_in_process(job, collector, stop)
            else:
                _run_in_pool(job, units, workers, collector, stop)
        finally:
            bar.close()
        if stop.signum is not None:
            raise RunInterrupted(stop.signum, collector.progress.units_done, len(units))
        return collector.progress


# ------------------------------------------------------------------------------------------------ internals


@dataclass
class _Task:
    unit: int  # position in the run's unit list
    position: int  # the batch's position in its unit
    batch: Any
    attempts: int = 0


class _StopSignals:
    """While active (main thread only), SIGINT and SIGTERM only record the signal: the engine stops between
    commits, so no commit is ever cut in half."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class UnitCollector:
    """Results per unit, in batch order; commits a unit when its last batch arrives (both engines use it:
    batches finish in any order)."""

    def __init__(self, job: BatchJob, units: Sequence[Unit], bar: Any) -> None:
        self.job, self.units, self.bar = job, units, bar
        self.results: dict[int, list[pa.Table | None]] = {i: [None] * len(u.batches) for i, u in enumerate(units)}
        self.progress = JobProgress()

    def tasks(self) -> Iterator[_Task]:
        for i, unit in enumerate(self.units):
            for position, batch in enumerate(unit.batches):
                yield _Task(i, position, batch)

    def add(self, task: _Task, table: pa.Table) -> bool:
        """Returns True when this completed (and committed) the task's unit."""
        results = self.results[task.unit]
        results[task.position] = table
        self.bar.update(table.num_rows)
        if any(r is None for r in results):
            return False
        unit = self.units[task.unit]
        self.job.commit(unit, results)  # type: ignore[arg-type] - complete: no None left
        del self.results[task.unit]
        self.progress.units_done += 1
        return True


def _run_in_process(job: BatchJob, collector: UnitCollector, stop: _StopSignals) -> None:
    worker = job.worker()
    worker.prepare()  # bad weights fail here, before any work
    for task in collector.tasks():
        if stop.signum is not None:
            return
        collector.add(task, worker(task.batch))


def _run_in_pool(job: BatchJob, units: Sequence[Unit], workers: int, collector: UnitCollector, stop: _StopSignals) -> None:
    context = _context(job)
    if context.get_start_method() == "forkserver":
        # Boot the server (it imports torch, ~1 s) while job.worker() runs here (align exports its network then).
        import multiprocessing.forkserver

        multiprocessing.forkserver.ensure_running()
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = _Pool(context, job.worker(), threads)
    todo = deque(collector.tasks())
    open_units = list(range(len(units)))  # uncommitted, oldest first
    try:
        pool.grow(min(workers, len(todo)))
        while (todo or pool.in_flight()) and stop.signum is None:
            while todo and todo[0].unit in open_units[:OPEN_UNITS] and pool.submit(todo[0]):
                todo.popleft()
            done, deaths = pool.poll(timeout=0.2)
            for task, table in done:
                if collector.add(task, table):
                    open_units.remove(task.unit)
            for died in deaths:
                retry = _after_death(job, died, collector, open_units)
                todo.extendleft(reversed(retry))  # back to the front, in batch order
                if todo or pool.in_flight():
                    pool.grow(1)
    finally:
        pool.close(terminate=stop.signum is not None or bool(todo) or bool(pool.in_flight()))


def _after_death(job: BatchJob, died: "_Died", collector: UnitCollector, open_units: list[int]) -> list[_Task]:
    """The died worker's tasks: the one it was running is charged an attempt (and recorded as failed after
    ``MAX_RETRIES`` retries); the ones queued behind it go back as they were."""
    retry = list(died.untouched)
    for n, task in enumerate(died.tasks):
        if n == 0:
            task.attempts += 1
            if task.attempts > MAX_RETRIES:
                reason = f"worker process died {task.attempts} times on this batch ({died.cause})"
                collector.progress.failed_batches.append(reason)
                if collector.add(task, job.failed(task.batch, reason)):
                    open_units.remove(task.unit)
                continue
            collector.progress.retried_batches += 1
        retry.append(task)
    return retry


def _context(job: BatchJob) -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Workers fork from a server that ignores Ctrl-C from birth and imported torch and the job's module once.
        context.set_forkserver_preload(["facepipe.engine._forkserver_preload", type(job).__module__])
        return context
    return multiprocessing.get_context("spawn")


@dataclass
class _Died:
    tasks: list[_Task]  # in the order the worker was running them
    cause: str
    untouched: list[_Task] = field(default_factory=list)  # it died before running any: they go back as they were


@dataclass
class _Slot:
    """One worker process, the pipes to and from it, and the tasks it holds in submission order."""

    process: multiprocessing.process.BaseProcess
    to_worker: multiprocessing.connection.Connection
    from_worker: multiprocessing.connection.Connection
    tasks: list[_Task] = field(default_factory=list)
    ready: bool = False  # its worker's prepare() succeeded


class _Pool:
    """Worker processes with one task pipe and one result pipe each (a shared queue's lock dies with a killed
    worker; a private pipe tells exactly which tasks a dead worker held)."""

    def __init__(self, context: multiprocessing.context.BaseContext, worker: BatchWorker, threads: int) -> None:
        self.context, self.worker, self.threads = context, worker, threads
        self.slots: list[_Slot] = []
        self.setup_deaths = 0  # workers that died before their model was ready, since one last was

    def grow(self, count: int) -> None:
        for _ in range(count):
            task_reader, task_writer = self.context.Pipe(duplex=False)
            result_reader, result_writer = self.context.Pipe(duplex=False)
            process = self.context.Process(
                target=_worker_main, args=(task_reader, result_writer, self.worker, self.threads), daemon=True,
                name="facepipe-worker",
            )
            process.start()
            task_reader.close()
            result_writer.close()
            self.slots.append(_Slot(process, task_writer, result_reader))

    def in_flight(self) -> int:
        return sum(len(slot.tasks) for slot in self.slots)

    def submit(self, task: _Task) -> bool:
        """Hand ``task`` to the least busy worker with room; False when every worker is full."""
        slot = min(self.slots, key=lambda s: len(s.tasks), default=None)
        if slot is None or len(slot.tasks) >= MAX_IN_FLIGHT_PER_WORKER:
            return False
        try:
            slot.to_worker.send((task.batch,))
        except OSError:  # died since: poll() reports it, with this task
            pass
        slot.tasks.append(task)
        return True

    def poll(self, timeout: float) -> tuple[list[tuple[_Task, pa.Table]], list[_Died]]:
        """Finished tasks (waits up to ``timeout`` for one) and the workers that died since (removed, with the tasks
        they still held). Raises what a worker's ``prepare()`` or ``__call__`` raised: the job cannot go on."""
        ready = multiprocessing.connection.wait([slot.from_worker for slot in self.slots], timeout)
        done = [result for slot in self.slots if slot.from_worker in ready for result in self._drain(slot)]
        died = []
        for slot in [s for s in self.slots if not s.process.is_alive()]:
            done.extend(self._drain(slot))  # what it sent before it died
            self.slots.remove(slot)
            slot.process.join()
            slot.to_worker.close()
            slot.from_worker.close()
            code = slot.process.exitcode
            cause = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
            if not slot.ready:  # its tasks never ran: they go back as they were
                self.setup_deaths += 1
                if self.setup_deaths > MAX_RETRIES:
                    raise WorkerSetupError(f"worker processes keep dying while loading their model ({cause})")
                died.append(_Died([], cause, slot.tasks))
                continue
            died.append(_Died(slot.tasks, cause))
        return done, died

    def _drain(self, slot: _Slot) -> list[tuple[_Task, pa.Table]]:
        done = []
        try:
            while slot.from_worker.poll():
                kind, value = slot.from_worker.recv()
                if kind == "ready":
                    slot.ready = True
                    self.setup_deaths = 0
                elif kind == "result":
                    done.append((slot.tasks.pop(0), value))
                else:  # "error"
                    raise value
        except (EOFError, OSError):
            pass  # the worker died: poll() handles it
        return done

    def close(self, terminate: bool) -> None:
        """Stop every worker: a polite end-of-work when all is done, SIGTERM otherwise; SIGKILL after 5 s."""
        for slot in self.slots:
            try:
                if terminate:
                    slot.process.terminate()
                else:
                    slot.to_worker.send(None)
            except (OSError, ValueError):
                pass
        for slot in self.slots:
            slot.process.join(5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.to_worker.close()
            slot.from_worker.close()
        self.slots = []


def _worker_main(tasks: multiprocessing.connection.Connection, results: multiprocessing.connection.Connection,
                 worker: BatchWorker, threads: int) -> None:
    """A worker process: ignore Ctrl-C (the parent stops us), die with the parent, prepare, then run batches."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(tasks, inbox), daemon=True, name="facepipe-inbox").start()
    try:
        limit_threads(threads)
        worker.prepare()
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which reports it as one error
        results.send(("error", _portable(exc)))
        return
    results.send(("ready", None))
    while (message := inbox.get()) is not None:
        try:
            table = worker(message[0])
        except Exception as exc:  # noqa: BLE001 - a job bug (items' failures are rows): the parent re-raises it
            results.send(("error", _portable(exc)))
            return
        results.send(("result", table))


def _receive(tasks: multiprocessing.connection.Connection, inbox: queue.SimpleQueue) -> None:
    """Move tasks into ``inbox`` as they come (so the parent's sends never block on a busy worker), and end the
    process when the parent is gone, however it died: its end of our pipes closes with it."""
    parent = multiprocessing.parent_process()
    watched: list[Any] = [tasks] + ([parent.sentinel] if parent is not None else [])
    while True:
        ready = multiprocessing.connection.wait(watched)
        if tasks not in ready:
            os._exit(1)  # the parent died
        try:
            message = tasks.recv()
        except (EOFError, OSError):
            os._exit(1)  # the parent died (or closed our pipe): nobody is left to use our work
        inbox.put(message)
        if message is None:
            return


def _portable(exc: Exception) -> Exception:
    """``exc`` for the parent to raise: its type kept when it survives pickling (so the command maps it to one
    clear line), its traceback in this process kept as a note (shown if the parent prints a traceback)."""
    import traceback

    where = "in a facepipe worker process:\n" + "".join(traceback.format_exception(exc)).rstrip()
    try:
        exc.add_note(where)
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001
        portable = RuntimeError(f"{type(exc).__name__}: {exc}")
        portable.add_note(where)
        return portable
