"""The contract between a batch job (align, embed, IJB-C features) and the engines that run it.

A job splits its pending work into **units** (the unit of commitment: an align chunk, an embedding shard, a
feature-cache shard), each a list of **batches** (the unit of work: what one model call takes). An engine — local
processes (``engine/local.py``) or a Ray actor pool (``engine/ray_engine.py``) — runs the job's **worker** on every
batch, wherever it likes, and hands each unit's results back to the job's ``commit`` in this process, in batch
order, once all of the unit's batches are done. ``finish`` runs once, after every unit is committed.

Rules every job keeps, so that any engine can run it:
- batches and the worker are picklable; the worker builds its model lazily, in the process that uses it
  (``prepare`` builds it eagerly, so that bad weights fail before any work);
- a worker's result for a batch is a ``pyarrow.Table`` (the job's result columns, defined once per job), which
  crosses process and Ray boundaries as Arrow, with ``num_rows`` = the items of the batch done (progress);
- a failure inside a batch that concerns one item becomes that item's ``error`` row, not an exception, so every
  batch gives at least one row (engines count a batch done by its table, and progress by its rows);
- ``commit`` writes the unit's outputs, then its marker (``facepipe.io.run_state``).

Jobs never import an engine; commands choose the engine (``facepipe.engine.local.run_job``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import pyarrow as pa


@dataclass(frozen=True)
class Unit:
    """A unit of commitment: its id (the part id it commits as) and its batches (picklable descriptors)."""

    id: int
    batches: tuple[Any, ...]
    items: int = 0  # how many items the unit covers (progress totals)


@runtime_checkable
class BatchWorker(Protocol):
    """Picklable per-batch work: builds its model on first use (or in ``prepare``)."""

    def prepare(self) -> None: ...

    def __call__(self, batch: Any) -> pa.Table: ...


@runtime_checkable
class BatchJob(Protocol):
    """A resumable job over units of batches (see the module docstring)."""

    name: str  # for progress bars and messages
    device: str  # "cpu" or "cuda[:N]": engines size their worker processes / actors by it

    def pending(self) -> list[Unit]: ...

    def worker(self, device: str | None = None) -> BatchWorker:
        """The picklable worker, its model on ``device`` (``None``: the job's own ``device``; Ray actors get the
        device their GPU share gives them)."""
        ...

    def failed(self, batch: Any, reason: str) -> pa.Table:
        """The result table recording every item of ``batch`` as ``error`` with ``reason``: what an engine commits
        for a batch whose worker process kept dying (after retries), so the run goes on and nothing is silent."""
        ...

    def commit(self, unit: Unit, results: Sequence[pa.Table]) -> None: ...

    def finish(self) -> Any: ...


@dataclass
class JobProgress:
    """What an engine did: units committed (an interrupted run's message counts them), batches retried or given
    up on."""

    units_done: int = 0
    retried_batches: int = 0
    failed_batches: list[str] = field(default_factory=list)
