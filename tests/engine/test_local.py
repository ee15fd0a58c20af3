"""The local engine: worker processes against in-process runs, what a worker's death and a bad model do, and
real ``facepipe align`` runs interrupted by SIGINT, by ``kill -9`` of the main process, and by ``kill -9`` of one
worker (as the OOM killer would)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from facepipe.engine.job import Unit
from facepipe.engine.local import MAX_RETRIES, RunInterrupted, WorkerSetupError, run_job, run_local
from facepipe.pipeline.align import AlignConfig, run_align
from facepipe.pipeline.sources import directory_source
from tests.conftest import shared_path

# ------------------------------------------------------------------------------------- a small real job


@dataclass
class PowerWorker:
    """Raises numbers to a power. ``die_on``: a number whose batch kills the worker process (SIGKILL, as the OOM
    killer would), while the file ``marker`` lists fewer than ``deaths`` deaths (-1: always)."""

    exponent: int = 2
    die_on: int = -1
    marker: str = ""
    deaths: int = -1
    broken: bool = False

    def prepare(self) -> None:
        if self.broken:
            raise ValueError("bad weights: not a checkpoint")

    def __call__(self, batch: tuple[int, ...]) -> pa.Table:
        if self.die_on in batch:
            died = Path(self.marker).read_text().count("x") if os.path.exists(self.marker) else 0
            if self.deaths < 0 or died < self.deaths:
                with open(self.marker, "a") as f:
                    f.write("x")
                os.kill(os.getpid(), signal.SIGKILL)
        return pa.table({"n": pa.array(batch, pa.int64()), "value": pa.array([v**self.exponent for v in batch], pa.int64()),
                         "pid": pa.array([os.getpid()] * len(batch), pa.int64())})


class PowerJob:
    """``n`` numbers in units of ``unit`` numbers, batches of ``batch``; commits record (unit id, table)."""

    name = "powers"
    device = "cpu"

    def __init__(self, n: int = 30, unit: int = 7, batch: int = 3, **worker: object) -> None:
        numbers = list(range(n))
        self.units = [
            Unit(u, tuple(tuple(numbers[s : s + batch][: unit - (s - start)]) for s in range(start, min(start + unit, n), batch)),
                 len(numbers[start : start + unit]))
            for u, start in enumerate(range(0, n, unit))
        ]
        self.worker_settings = worker
        self.committed: list[tuple[int, pa.Table]] = []

    def pending(self) -> list[Unit]:
        return self.units

    def worker(self, device: str | None = None) -> PowerWorker:
        return PowerWorker(**self.worker_settings)

    def failed(self, batch: tuple[int, ...], reason: str) -> pa.Table:
        return pa.table({"n": pa.array(batch, pa.int64()), "value": pa.array([-1] * len(batch), pa.int64()),
                         "pid": pa.array([0] * len(batch), pa.int64())})

    def commit(self, unit: Unit, results: list[pa.Table]) -> None:
        self.committed.append((unit.id, pa.concat_tables(results)))

    def finish(self) -> dict[int, list[int]]:
        return {unit: table.column("value").to_pylist() for unit, table in sorted(self.committed)}


def test_worker_processes_commit_every_unit_in_batch_order():
    job = PowerJob(n=30, unit=7, batch=3)
    assert run_job(job, workers=2, progress=False) == {u: [n * n for n in range(7 * u, min(7 * u + 7, 30))] for u in range(5)}
    pids = {pid for _, table in job.committed for pid in table.column("pid").to_pylist()}
    assert len(pids) == 2 and os.getpid() not in pids
    in_process = PowerJob(n=30, unit=7, batch=3)
    assert run_job(in_process, workers=0, progress=False) == job.finish()
    assert {pid for _, t in in_process.committed for pid in t.column("pid").to_pylist()} == {os.getpid()}


def test_a_killed_worker_is_replaced_and_its_batch_retried(tmp_path):
    job = PowerJob(n=20, die_on=9, marker=str(tmp_path / "deaths"), deaths=1)
    progress = run_local(job, workers=2, progress=False)
    assert (tmp_path / "deaths").read_text() == "x"
    assert job.finish() == {u: [n * n for n in range(7 * u, min(7 * u + 7, 20))] for u in range(3)}
    assert (progress.units_done, progress.retried_batches, progress.failed_batches) == (3, 1, [])


def test_a_batch_that_keeps_killing_its_worker_becomes_failed_rows(tmp_path):
    job = PowerJob(n=20, die_on=9, marker=str(tmp_path / "deaths"))
    progress = run_local(job, workers=2, progress=False)
    assert (tmp_path / "deaths").read_text() == "x" * (1 + MAX_RETRIES)
    values = job.finish()
    assert values[1] == [-1, -1, -1, 100, 121, 144, 169]  # batch (7, 8, 9) recorded by job.failed, the rest done
    assert values[0] == [n * n for n in range(7)] and values[2] == [n * n for n in range(14, 20)]
    assert len(progress.failed_batches) == 1 and "killed by SIGKILL" in progress.failed_batches[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_worker_that_cannot_prepare_fails_the_run_with_its_own_error(workers):
    job = PowerJob(broken=True)
    with pytest.raises(ValueError, match="bad weights: not a checkpoint"):
        run_local(job, workers=workers, progress=False)
    assert job.committed == []


@dataclass
class BuggyWorker(PowerWorker):
    def __call__(self, batch: tuple[int, ...]) -> pa.Table:
        return {}[batch]  # a bug in a job's worker (an item's failure would be an error row instead)


def test_a_bug_in_a_worker_ends_the_run_with_its_exception_and_the_workers_traceback():
    class BuggyJob(PowerJob):
        def worker(self, device=None):
            return BuggyWorker()

    with pytest.raises(KeyError) as caught:
        run_local(BuggyJob(), workers=1, progress=False)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "in a facepipe worker process" in notes and "return {}[batch]" in notes


def test_a_worker_that_dies_while_loading_is_one_error(tmp_path):
    class DiesLoading(PowerJob):
        def worker(self, device=None):
            return DyingLoader()

    with pytest.raises(WorkerSetupError, match="keep dying while loading their model"):
        run_local(DiesLoading(), workers=1, progress=False)


@dataclass
class DyingLoader(PowerWorker):
    def prepare(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class InterruptingJob(PowerJob):
    """Sends itself ``signum`` (as Ctrl-C or ``kill`` would) right after committing unit 0."""

    def __init__(self, signum: int, **settings: object) -> None:
        super().__init__(**settings)
        self.signum = signum

    def commit(self, unit: Unit, results: list[pa.Table]) -> None:
        super().commit(unit, results)
        if unit.id == 0:
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def roomy_signal_stack():
    """A 1 MiB alternate signal stack for this thread while the test signals its own process.

    Python's signal handlers run on the thread's alternate stack when one is set (``SA_ONSTACK``), and tests
    earlier in the same process leave a small one (pytest's faulthandler; after OpenVINO had run, the full
    suite crashed inside ``kill`` itself: the kernel could not push the signal frame, seen with gdb). A user's
    command has no such stack and stops cleanly on Ctrl-C during OpenVINO runs (checked by hand)."""
    import ctypes

    class StackT(ctypes.Structure):  # Linux stack_t
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    libc = ctypes.CDLL(None, use_errno=True)
    memory = ctypes.create_string_buffer(1 << 20)
    roomy, previous = StackT(ctypes.cast(memory, ctypes.c_void_p), 0, len(memory)), StackT()
    if libc.sigaltstack(ctypes.byref(roomy), ctypes.byref(previous)) != 0:
        pytest.skip(f"sigaltstack: {os.strerror(ctypes.get_errno())}")
    yield
    libc.sigaltstack(ctypes.byref(previous), None)


@pytest.mark.usefixtures("roomy_signal_stack")
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_stops_between_commits_and_ends_the_workers(signum, workers):
    import multiprocessing

    job = InterruptingJob(signum, n=40, unit=4, batch=2)
    name = signal.Signals(signum).name
    with pytest.raises(RunInterrupted, match=rf"interrupted \({name}\): \d of 10 pending parts committed; rerun the same command to resume") as caught:
        run_local(job, workers=workers, progress=False)
    assert caught.value.exit_code == 128 + signum
    committed = [unit for unit, _ in job.committed]
    assert committed[0] == 0 and len(committed) < 10  # stopped: no new batch after the signal
    assert all(table.num_rows == job.units[unit].items for unit, table in job.committed)  # whole units only
    assert multiprocessing.active_children() == []  # workers terminated and reaped
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -------------------------------------------------------------------------- real align runs, interrupted


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) for every process (/proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = _proc_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie waiting for its reaper is gone for our purpose)."""
    table = _proc_table()
    return {pid for pid in pids if pid in table and table[pid][1] != "Z"}


def wait_until(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
ALIGN_ARGS = ["--chunk-size", "2", "--batch-size", "1", "--workers", "2", "--no-progress"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    """10 celebrity photos (~474 px), one folder per identity."""
    src = shared_path("images", "celebrities")
    root = tmp_path_factory.mktemp("faces")
    for path in sorted(src.glob("0*.jpg"))[:10]:
        (root / path.name[:3]).mkdir(exist_ok=True)
        shutil.copy(path, root / path.name[:3] / path.name)
    return root


@pytest.fixture(scope="module")
def reference(faces, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    run_align(AlignConfig(), directory_source(faces), out, workers=0, batch_size=1, chunk_size=2, progress=False)
    return out


def outputs(root: Path) -> dict[str, bytes]:
    """Crops and the manifest (not the run state: its lock file names the last run's process)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".facepipe" not in p.relative_to(root).parts}


def start_align(faces: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-m", "facepipe", "align", str(faces), "--out", str(out), *ALIGN_ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def committed(out: Path) -> int:
    return len(list((out / ".facepipe" / "parts").glob("chunk-*.parquet")))


@pytest.mark.slow  # two whole `facepipe align` runs (torch, forkserver, workers): 16-85 s on 2 shared cores
@linux_only
def test_sigint_stops_with_one_line_leaves_no_process_and_the_rerun_resumes(faces, reference, tmp_path):
    out = tmp_path / "out"
    run = start_align(faces, out)
    assert wait_until(lambda: committed(out) >= 1, 120), run.communicate()
    family = descendants(run.pid)
    os.killpg(run.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the main process, workers, forkserver, tracker
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT): "), stderr
    assert "of 5 pending parts committed; rerun the same command to resume" in lines[0]
    assert "Traceback" not in stderr + stdout
    assert wait_until(lambda: not alive(family), 10), alive(family)  # workers, forkserver, resource tracker
    done = committed(out)
    assert 1 <= done < 5 and not (out / "manifest.parquet").exists()

    rerun = start_align(faces, out)
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert f"({2 * done} already done)" in stdout
    assert outputs(out) == outputs(reference)


@linux_only
def test_kill_9_of_the_main_process_takes_its_workers_with_it(faces, tmp_path):
    out = tmp_path / "out"
    run = start_align(faces, out)
    assert wait_until(lambda: committed(out) >= 1, 120), run.communicate()
    family = descendants(run.pid)
    assert len(family) >= 3  # forkserver (+ its 2 workers), resource tracker
    run.kill()
    run.wait()  # not communicate(): orphans that inherited its stdout would keep the pipe open
    assert wait_until(lambda: not alive(family), 5), f"left running: {alive(family)}"


@linux_only
def test_kill_9_of_one_worker_is_retried_and_the_run_completes(faces, reference, tmp_path):
    out = tmp_path / "out"
    run = start_align(faces, out)
    assert wait_until(lambda: committed(out) >= 1, 120), run.communicate()
    table = _proc_table()
    forkserver = [pid for pid in descendants(run.pid) if table.get(pid, (0, ""))[0] == run.pid
                  and b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    workers = sorted(pid for pid in descendants(run.pid) if table.get(pid, (0, ""))[0] in forkserver)
    assert len(workers) == 2, (forkserver, workers)
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "ok 10, no_face 0, error 0" in stdout and "Traceback" not in stderr
    assert outputs(out) == outputs(reference)
