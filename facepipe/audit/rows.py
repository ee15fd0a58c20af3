"""An embedding folder's usable rows, L2-normalised on read from its shard files: an (N, D) float32 matrix that
is never in memory whole.

An MS1M-size set (5.8 M × 512 float32) is 12 GB, more than the audit's memory budget, so the audit streams it:
contiguous row ranges for its passes over the set (identity chunks, neighbour queries) and gathers of scattered
rows for the per-cell neighbour search. Rows are normalised exactly as a whole-matrix load would be (``x / ‖x‖``
in float32), so results do not depend on how the rows were read.

Rows are read with ``pread`` into the caller's arrays, not through a memory map: the file's pages then live in
the page cache only (shared, reclaimable, outside the process's RSS). A memory map counts every page it maps in
the RSS until told ``MADV_DONTNEED``, and a gather maps far more than it reads: measured here, 200 scattered rows
of a 1 GB shard mapped 315 MB (the kernel maps whole cached folios around each fault), and unmapping them again
cost 1.8 ms, ten times the gather. Runs of consecutive rows are read with one call each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class ShardFile:
    """One ``.npy`` matrix read with ``pread`` (C order, 2-d)."""

    def __init__(self, path: str | Path) -> None:
        self.file = open(path, "rb", buffering=0)  # noqa: SIM115 - lives as long as the rows that read it
        version = np.lib.format.read_magic(self.file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, self.dtype = read_header(self.file)
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-order 2-d matrix, found shape {shape}")
        self.rows, self.dim = shape
        self.offset = self.file.tell()
        self.row_bytes = self.dim * self.dtype.itemsize

    def read(self, file_rows: np.ndarray) -> np.ndarray:
        """Rows ``file_rows``, as stored; one ``pread`` per run of consecutive rows."""
        ascending = bool((np.diff(file_rows) >= 0).all())
        order = None if ascending else np.argsort(file_rows, kind="stable")
        wanted = file_rows if order is None else file_rows[order]
        out = np.empty((len(wanted), self.dim), self.dtype)
        if not len(wanted):
            return out
        if wanted[0] < 0 or wanted[-1] >= self.rows:
            raise IndexError(f"row {wanted[-1]} of a {self.rows}-row shard")
        runs = np.flatnonzero(np.r_[True, np.diff(wanted) != 1, True])
        view = memoryview(out.reshape(-1).view(np.uint8))
        for lo, hi in zip(runs[:-1].tolist(), runs[1:].tolist()):
            self._read_into(view[lo * self.row_bytes : hi * self.row_bytes], self.offset + int(wanted[lo]) * self.row_bytes)
        if order is None:
            return out
        unsorted = np.empty_like(out)
        unsorted[order] = out
        return unsorted

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        while len(buffer):
            got = os.preadv(self.file.fileno(), [buffer], offset)
            if got <= 0:
                raise OSError(f"{self.file.name}: truncated at byte {offset}")
            buffer, offset = buffer[got:], offset + got


class ShardRows:
    """Rows ``positions[s]`` of each shard matrix ``s``, concatenated: ``rows[a:b]`` and ``rows[indices]`` give
    float32 unit rows (see the module docstring); ``np.asarray(rows)`` reads them all."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, shards: Sequence[tuple[str | Path, np.ndarray]]) -> None:
        """``shards``: (``.npy`` path, positions of the rows taken from it, in order) per shard."""
        self._sources = [(str(path), np.asarray(positions, dtype=np.int64)) for path, positions in shards]
        self._files: list[ShardFile] = []
        self._positions: list[np.ndarray | None] = []  # None: the shard's rows 0..n-1, in order
        for path, positions in self._sources:
            if not len(positions):
                continue
            shard = ShardFile(path)
            whole = len(positions) == shard.rows and bool((positions == np.arange(shard.rows)).all())
            self._files.append(shard)
            self._positions.append(None if whole else positions)
        dims = {shard.dim for shard in self._files}
        if len(dims) > 1:
            raise ValueError(f"shards of different widths {sorted(dims)}")
        counts = [f.rows if p is None else len(p) for f, p in zip(self._files, self._positions)]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.shape = (int(self._starts[-1]), dims.pop() if dims else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            key = np.arange(start, max(start, stop), step)
        elif isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self._take(key.astype(np.int64, copy=False))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"sources": self._sources}  # pickles as its file names and row positions (Ray workers open their own)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sources"])

    def _take(self, indices: np.ndarray) -> np.ndarray:
        n = len(self)
        if len(indices) and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"row index out of range for {n} rows")
        indices = np.where(indices < 0, indices + n, indices)
        order = np.argsort(indices, kind="stable")  # in file order: consecutive rows become one read
        ordered = indices[order]
        out = np.empty((len(indices), self.shape[1]), np.float32)
        bounds = np.searchsorted(ordered, self._starts)
        for shard, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if lo < hi:
                local = ordered[lo:hi] - self._starts[shard]
                positions = self._positions[shard]
                out[order[lo:hi]] = self._files[shard].read(local if positions is None else positions[local])
        return out / np.linalg.norm(out, axis=1)[:, None]
