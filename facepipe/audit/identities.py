"""The per-identity part of an audit — robust centres, leave-one-out scores, split-half centre pairs — as a
``BatchJob`` (``facepipe.engine.job``) over chunks of whole identities, so that either engine runs it: this
process (``engine="local"``, the default) or Ray tasks (``--engine ray``).

A chunk is a run of consecutive identity codes holding at most ``CHUNK_ROWS`` images (or one identity, however
large). Its worker reads the chunk's rows once, in file order, and computes everything on them in memory with the
functions of ``facepipe.audit.checks``; one result row per identity comes back (its robust sum and count, its
split-half similarity, and its images' rows, kept flags and leave-one-out scores), and ``commit`` files them into
the run's arrays. Both engines run the same chunks through the same code, so their results are equal to the bit,
and a set within one chunk gives exactly what the whole-set functions give. On Ray, a worker reads its chunk's rows
from the shard files itself (``ShardRows`` pickles as file names: a file system every node sees, as for any Ray
job; a set held in memory travels in the worker). Nothing is written to disk: an audit is rerun, not resumed, so
every unit is always pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from facepipe.audit.checks import Centres, leave_one_out_scores, robust_centres, split_half_similarities, unit_rows
from facepipe.engine.job import Unit

CHUNK_ROWS = 65_536  # images per chunk: ~128 MB of float32 rows at 512-d


@dataclass(frozen=True)
class IdentityChunk:
    """Identities ``first .. first + count - 1`` and their images (rows ascending)."""

    first: int
    count: int
    rows: np.ndarray  # (n,) int64 row indices into the set
    identity: np.ndarray  # (n,) int64 codes minus ``first``


@dataclass
class IdentityStatistics:
    centres: Centres
    score: np.ndarray  # (N,) leave-one-out own-centre similarity; NaN for singletons / no identity
    split_half: np.ndarray  # split-half centre similarities of the identities with ≥ 4 images, in code order


class IdentityWorker:
    """Picklable per-chunk work: the set's rows travel as a reference (``ShardRows`` pickles as file names)."""

    def __init__(self, vectors: Any) -> None:
        self.vectors = vectors

    def prepare(self) -> None:
        pass

    def __call__(self, chunk: IdentityChunk) -> pa.Table:
        x = np.asarray(self.vectors[chunk.rows])
        centres = robust_centres(x, chunk.identity, chunk.count)
        score = leave_one_out_scores(x, chunk.identity, centres)
        counts = np.bincount(chunk.identity, minlength=chunk.count)
        split = np.full(chunk.count, np.nan)
        split[counts >= 4] = split_half_similarities(x, chunk.identity, chunk.count)
        members = np.argsort(chunk.identity, kind="stable")  # by identity, row order within one
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

        def per_identity(values: np.ndarray) -> pa.ListArray:
            return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[members]))

        return pa.table(
            {
                "identity": pa.array(np.arange(chunk.first, chunk.first + chunk.count, dtype=np.int64)),
                "sum": pa.FixedSizeListArray.from_arrays(pa.array(centres.sums.reshape(-1)), x.shape[1]),
                "count": pa.array(centres.counts),
                "split_half": pa.array(split),
                "rows": per_identity(chunk.rows),
                "kept": per_identity(centres.kept),
                "score": per_identity(score),
            }
        )


class IdentityJob:
    """Per-identity statistics of a set (module docstring); ``finish`` returns ``IdentityStatistics``."""

    name = "audit identities"
    device = "cpu"

    def __init__(self, vectors: Any, identity: np.ndarray, n_identities: int, chunk_rows: int = CHUNK_ROWS) -> None:
        self.vectors, self.identity = vectors, identity
        self.chunks = _chunks(identity, n_identities, chunk_rows)
        self.sums = np.zeros((n_identities, vectors.shape[1]), dtype=np.float64)
        self.counts = np.zeros(n_identities, dtype=np.int64)
        self.split = np.full(n_identities, np.nan)
        self.kept = np.zeros(len(identity), dtype=bool)
        self.score = np.full(len(identity), np.nan)

    def pending(self) -> list[Unit]:
        return [Unit(i, (chunk,), items=chunk.count) for i, chunk in enumerate(self.chunks)]

    def worker(self, device: str | None = None) -> IdentityWorker:
        return IdentityWorker(self.vectors)

    def failed(self, batch: IdentityChunk, reason: str) -> pa.Table:
        # No row of an audit can stand for a lost identity: its centre feeds every check. The run stops.
        raise RuntimeError(f"audit: identities {batch.first}..{batch.first + batch.count - 1} could not be computed ({reason})")

    def commit(self, unit: Unit, results: Sequence[pa.Table]) -> None:
        for table in results:
            codes = table.column("identity").to_numpy()
            self.sums[codes] = table.column("sum").combine_chunks().flatten().to_numpy().reshape(len(codes), -1)
            self.counts[codes] = table.column("count").to_numpy()
            self.split[codes] = table.column("split_half").to_numpy()
            rows = table.column("rows").combine_chunks().flatten().to_numpy()
            self.kept[rows] = table.column("kept").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            self.score[rows] = table.column("score").combine_chunks().flatten().to_numpy()

    def finish(self) -> IdentityStatistics:
        enough = np.bincount(self.identity[self.identity >= 0], minlength=len(self.counts)) >= 4
        centres = Centres(self.sums, self.counts, self.kept, unit_rows(self.sums))
        return IdentityStatistics(centres, self.score, self.split[enough])


def _chunks(identity: np.ndarray, n_identities: int, chunk_rows: int) -> list[IdentityChunk]:
    """Runs of consecutive identity codes with at most ``chunk_rows`` images (one identity may exceed it)."""
    valid = np.flatnonzero(identity >= 0)
    by_identity = valid[np.argsort(identity[valid], kind="stable")]
    ends = np.cumsum(np.bincount(identity[valid], minlength=n_identities))  # rows up to each identity's end
    chunks, first, start = [], 0, 0
    while first < n_identities:
        last = max(first + 1, int(np.searchsorted(ends, start + chunk_rows, side="right")))  # identities [first, last)
        last = min(last, n_identities)
        rows = np.sort(by_identity[start : ends[last - 1]])
        chunks.append(IdentityChunk(first, last - first, rows, identity[rows] - first))
        first, start = last, int(ends[last - 1])
    return chunks


def identity_statistics(
    vectors: Any, identity: np.ndarray, n_identities: int, engine: str = "local", options: Any = None, chunk_rows: int | None = None
) -> IdentityStatistics:
    """Run the ``IdentityJob`` on ``engine`` ("local": this process; "ray": Ray tasks with ``options``, a
    ``RayOptions``); ``chunk_rows`` defaults to ``CHUNK_ROWS``."""
    from facepipe.engine.local import run_job

    job = IdentityJob(vectors, identity, n_identities, chunk_rows or CHUNK_ROWS)
    engine_options = {"options": options} if engine == "ray" else {}
    return run_job(job, engine=engine, workers=0, progress=False, **engine_options)
