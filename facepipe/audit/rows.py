"""An embedding folder's usable rows, L2-normalised on read from its memory-mapped shards: an (N, D) float32
matrix that is never in memory whole.

An MS1M-size set (5.8 M × 512 float32) is 12 GB, more than the audit's memory budget, so the audit streams it:
contiguous row ranges for its passes over the set (identity sums, leave-one-out scores, neighbour queries) and
gathers of scattered rows for the per-cell neighbour search. Rows are normalised exactly as a whole-matrix load
would be (``x / ‖x‖`` in float32), so results do not depend on how the rows were read.

Memory-mapped pages that were read stay mapped (and count in the process's RSS) until released: every
``RELEASE_BYTES`` read, the mappings are told ``MADV_DONTNEED``. The pages stay in the page cache, so reading
them again costs a page fault, not a disk read, and the resident set stays near what the caller holds.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any, Sequence

import numpy as np

RELEASE_BYTES = 256 << 20


def map_npy(path: str | Path) -> tuple[np.ndarray, mmap.mmap]:
    """A read-only view of a C-order ``.npy`` matrix over its own ``mmap`` (which ``madvise`` can release)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
        if fortran_order or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-order 2-d matrix, found shape {shape}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if shape[0] else None
    if mapped is None:
        return np.zeros(shape, dtype), None  # type: ignore[return-value] - nothing to map
    view = np.frombuffer(mapped, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)
    return view, mapped


class ShardRows:
    """Rows ``positions[s]`` of each shard matrix ``s``, concatenated: ``rows[a:b]`` and ``rows[indices]`` give
    float32 unit rows (see the module docstring); ``np.asarray(rows)`` reads them all."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, shards: Sequence[tuple[str | Path, np.ndarray]]) -> None:
        """``shards``: (``.npy`` path, positions of the rows taken from it, in order) per shard."""
        self._sources = [(str(path), np.asarray(positions, dtype=np.int64)) for path, positions in shards]
        self._matrices: list[np.ndarray] = []
        self._maps: list[mmap.mmap] = []
        self._positions: list[np.ndarray | None] = []  # None: the shard's rows 0..n-1, in order
        dims = set()
        for path, positions in self._sources:
            if not len(positions):
                continue
            matrix, mapped = map_npy(path)
            dims.add(matrix.shape[1])
            whole = len(positions) == len(matrix) and bool((positions == np.arange(len(matrix))).all())
            self._matrices.append(matrix)
            self._maps.append(mapped)
            self._positions.append(None if whole else positions)
        if len(dims) > 1:
            raise ValueError(f"shards of different widths {sorted(dims)}")
        counts = [len(m) if p is None else len(p) for m, p in zip(self._matrices, self._positions)]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.shape = (int(self._starts[-1]), dims.pop() if dims else 0)
        self._unreleased = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, max(start, stop))
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            return self._take(np.array([key]))[0]
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self._take(key.astype(np.int64, copy=False))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        rows = self._range(0, len(self))
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"sources": self._sources}  # pickles as its file names and row positions (Ray workers map their own)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["sources"])

    def release(self) -> None:
        """Drop the mapped pages read so far from this process's resident set (they stay in the page cache)."""
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)
        self._unreleased = 0

    # ------------------------------------------------------------------------------------------ internals

    def _read(self, shard: int, local: np.ndarray | slice) -> np.ndarray:
        positions = self._positions[shard]
        source = self._matrices[shard]
        rows = source[local] if positions is None else source[positions[local]]
        rows = np.asarray(rows, dtype=np.float32)  # a copy: nothing refers to the mapping afterwards
        self._unreleased += rows.nbytes
        return rows

    def _normalised(self, rows: np.ndarray) -> np.ndarray:
        if self._unreleased >= RELEASE_BYTES:
            self.release()
        return rows / np.linalg.norm(rows, axis=1)[:, None]

    def _range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for shard in range(max(first, 0), len(self._matrices)):
            lo, hi = self._starts[shard], self._starts[shard + 1]
            if lo >= stop:
                break
            parts.append(self._read(shard, slice(int(max(start, lo) - lo), int(min(stop, hi) - lo))))
        if not parts:
            return np.zeros((0, self.shape[1]), np.float32)
        return self._normalised(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _take(self, indices: np.ndarray) -> np.ndarray:
        if len(indices) and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        indices = np.where(indices < 0, indices + len(self), indices)
        order = np.argsort(indices, kind="stable")  # in file order: sequential reads where rows are near
        ordered = indices[order]
        out = np.empty((len(indices), self.shape[1]), np.float32)
        bounds = np.searchsorted(ordered, self._starts)
        for shard in range(len(self._matrices)):
            lo, hi = bounds[shard], bounds[shard + 1]
            if lo < hi:
                out[order[lo:hi]] = self._read(shard, ordered[lo:hi] - self._starts[shard])
        return self._normalised(out)
