"""Nearest neighbours by cosine similarity, exact where affordable and IVF beyond, with the recall measured.

Inputs are L2-normalised rows (float16 or float32), so inner product = cosine. Exact search (``IndexFlatIP``)
costs ``queries × base × D``; past ``exact_limit`` multiply-adds an inverted file is used (``nlist ≈ 4√N``
cells, ``nprobe`` visited): ``IndexIVFFlat`` while a float32 copy of the base fits ``flat_bytes``, beyond that
``IndexIVFPQ`` (``D/8`` bytes a vector) whose ``4k`` candidates are re-ranked exactly against the base itself,
so memory stays near the base's own size. The recall@k of either is measured against exact search (blockwise
matrix products) on a sample of queries, so every result says how much it may have missed.

**Image to image** (``image_neighbours``) past ``exact_limit`` searches *cells*, not the whole set: an inverted
file whose lists are the identities. Each image is filed in its own identity and in its nearest identity centres
(which the label-noise check has found already), and its neighbours are found exactly, by one matrix product per
cell, among the images filed with it. The cells are the training set's own coarse quantiser, with no k-means to
train: their number grows with the identities and their size does not, so time is linear in the images
(``Σ cell² × D``, about 4 × images × mean identity size × D) and memory is one cell's rows at a time, gathered from
the shard files, where an IVF over the images costs ``√N`` per query (nlist ∝ √N) and an exact re-rank of
PQ candidates reads ``4k`` rows per query. What it can miss — a neighbour whose nearest centres share none with the
query's — is what the measured recall counts; copies of one photo share their nearest centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

EXACT_LIMIT = 5e11  # multiply-adds: ~5-10 s of exact search on 2 quiet cores
FLAT_BYTES = 1 << 30  # past this, a float32 copy of the base in the index costs too much memory


@dataclass
class Neighbours:
    similarities: np.ndarray  # (Q, k) float32, best first; -inf where fewer than k exist
    indices: np.ndarray  # (Q, k) int64 into the base; -1 where fewer than k exist
    method: str  # "exact" or "ivf(nlist=..., nprobe=...)"
    recall: float  # recall@k against exact search (1.0 for exact)


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("the audit needs faiss: pip install 'facepipe[faiss]'") from exc
    return faiss


def _as_float32(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.ascontiguousarray(rows[start:stop], dtype=np.float32)


def _add_in_blocks(index, base: np.ndarray, block: int = 65536) -> None:
    for start in range(0, len(base), block):
        index.add(_as_float32(base, start, start + block))


def _search_in_blocks(index, queries: np.ndarray, k: int, block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        sims[start : start + block], ids[start : start + block] = index.search(_as_float32(queries, start, start + block), k)
    return sims, ids


def nearest(
    queries: np.ndarray,
    base: np.ndarray,
    k: int,
    exact_limit: float = EXACT_LIMIT,
    nprobe: int | None = None,
    recall_sample: int = 500,
    seed: int = 0,
    flat_bytes: float = FLAT_BYTES,
) -> Neighbours:
    """The ``k`` most similar base rows of every query (see the module docstring)."""
    faiss = _faiss()
    if len(base) == 0 or len(queries) == 0:
        return Neighbours(np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64), "exact", 1.0)
    dim = base.shape[1]
    k_eff = min(k, len(base))
    flat = faiss.IndexFlatIP(dim)
    if float(len(queries)) * len(base) * dim <= exact_limit:
        _add_in_blocks(flat, base)
        sims, ids = _search_in_blocks(flat, queries, k_eff)
        return Neighbours(*_pad(sims, ids, k), "exact", 1.0)
    nlist = max(1, min(int(4 * math.sqrt(len(base))), len(base) // 39))
    nprobe = nprobe or min(nlist, max(4, min(16, int(math.ceil(nlist / 64)))))  # recall is measured, not assumed
    compressed = float(len(base)) * dim * 4 > flat_bytes and dim % 8 == 0
    quantizer = faiss.IndexFlatIP(dim)
    if compressed:
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, dim // 8, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = base[np.sort(rng.choice(len(base), min(len(base), max(nlist * 64, 65536)), replace=False))]
    index.train(np.ascontiguousarray(train, dtype=np.float32))
    _add_in_blocks(index, base)
    index.nprobe = nprobe
    if compressed:
        _, candidates = _search_in_blocks(index, queries, min(len(base), 4 * k_eff))
        sims, ids = _rerank(queries, base, candidates, k_eff)
        method = f"ivfpq(nlist={nlist}, nprobe={nprobe}, m={dim // 8}) + exact re-rank of {candidates.shape[1]}"
    else:
        sims, ids = _search_in_blocks(index, queries, k_eff)
        method = f"ivf(nlist={nlist}, nprobe={nprobe})"
    del index
    sample = np.sort(rng.choice(len(queries), min(len(queries), recall_sample), replace=False))
    _, exact_ids = exact_top_k(queries[sample], base, k_eff)
    found = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids[sample], exact_ids)]
    recall = float(np.sum(found) / max(1, exact_ids.size))
    return Neighbours(*_pad(sims, ids, k), method, recall)


def image_neighbours(
    rows: np.ndarray,
    cells: np.ndarray,
    k: int,
    exact_limit: float = EXACT_LIMIT,
    recall_sample: int = 500,
    seed: int = 0,
) -> Neighbours:
    """Each row's ``k`` most similar rows (itself included): exact while affordable, else within the ``cells`` it
    is filed in ((N, c) cell ids, −1 for none; see the module docstring)."""
    if float(len(rows)) ** 2 * rows.shape[1] <= exact_limit:
        return nearest(rows, rows, k, exact_limit=exact_limit)
    return nearest_in_cells(rows, cells, k, recall_sample, seed)


def nearest_in_cells(rows: np.ndarray, cells: np.ndarray, k: int, recall_sample: int = 500, seed: int = 0, chunk: int = 2048) -> Neighbours:
    """Exact top-``k`` of every row among the rows that share a cell with it (a row shares its own cells)."""
    n = len(rows)
    cells = np.asarray(cells, dtype=np.int64).reshape(n, -1)
    member = np.repeat(np.arange(n, dtype=np.int64), cells.shape[1])
    cell = cells.reshape(-1)
    filed = cell >= 0
    pairs = np.unique(cell[filed] * np.int64(n) + member[filed])  # by cell, then row: one read pass in file order
    cell, member = pairs // n, pairs % n
    del pairs, filed
    bounds = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1], True])
    best_s = np.full((n, k), -np.inf, np.float32)
    best_i = np.full((n, k), -1, np.int64)
    # One thread for the per-cell products: at a few hundred rows threads gain little, and on busy cores
    # multi-threaded OpenBLAS spins on them ~10x slower (measured: 900 products of 220 rows, 13.8 s vs 1.2 s).
    with threadpool_limits(1, user_api="blas"):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            ids = member[lo:hi]
            x = rows[ids]
            kk = min(k, len(ids))
            for start in range(0, len(ids), chunk):  # a query chunk × the cell: bounded however large one identity is
                q = ids[start : start + chunk]
                sims = x[start : start + chunk] @ x.T
                top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < len(ids) else np.broadcast_to(np.arange(len(ids)), sims.shape)
                best_s[q], best_i[q] = _merge_top_k(best_s[q], best_i[q], np.take_along_axis(sims, top, 1), ids[top], k)
    method = f"identity cells: {len(bounds) - 1} cells, {len(member) / max(1, n):.2f} per image, exact within"
    del cell, member
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, min(n, recall_sample), replace=False))
    _, exact_ids = exact_top_k(rows[sample], rows, min(k, n))
    found = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(best_i[sample], exact_ids)]
    return Neighbours(best_s, best_i, method, float(np.sum(found) / max(1, exact_ids.size)))


def _merge_top_k(s1: np.ndarray, i1: np.ndarray, s2: np.ndarray, i2: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two candidate lists per row, each id once (a pair of rows may share several cells)."""
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    by_id = np.argsort(i, axis=1, kind="stable")
    s, i = np.take_along_axis(s, by_id, 1), np.take_along_axis(i, by_id, 1)
    repeated = np.zeros(i.shape, dtype=bool)
    repeated[:, 1:] = (i[:, 1:] == i[:, :-1]) & (i[:, 1:] >= 0)
    s[repeated], i[repeated] = -np.inf, -1
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, best, 1), np.take_along_axis(i, best, 1)


def exact_top_k(queries: np.ndarray, base: np.ndarray, k: int, block: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by blockwise products over the base (no copy of it), for a modest number of queries: each
    block's own top ``k`` first, then merged with the best so far (never a queries × block index array)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for start in range(0, len(base), block):
        sims = q @ _as_float32(base, start, start + block).T
        kk = min(k, sims.shape[1])
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        both_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
        both_i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(both_s, keep, 1), np.take_along_axis(both_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _rerank(queries: np.ndarray, base: np.ndarray, candidates: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact similarities of each query's candidates, best ``k`` first."""
    sims = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), block):
        cand = candidates[start : start + block]
        q = _as_float32(queries, start, start + block)
        rows = np.asarray(base[np.maximum(cand, 0).reshape(-1)], dtype=np.float32).reshape(*cand.shape, -1)
        s = np.einsum("qd,qcd->qc", q, rows)
        s[cand < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        sims[start : start + block] = np.take_along_axis(s, order, 1)
        ids[start : start + block] = np.where(np.take_along_axis(s, order, 1) > -np.inf, np.take_along_axis(cand, order, 1), -1)
    return sims, ids


def _pad(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if sims.shape[1] == k:
        return sims, ids
    extra = k - sims.shape[1]
    return (
        np.concatenate([sims, np.full((len(sims), extra), -np.inf, np.float32)], axis=1),
        np.concatenate([ids, np.full((len(ids), extra), -1, np.int64)], axis=1),
    )
