"""Nearest neighbours by cosine similarity, exact where affordable and IVF beyond, with the recall measured.

Inputs are L2-normalised rows (float16 or float32), so inner product = cosine. Exact search (``IndexFlatIP``)
costs ``queries × base × D``; past ``exact_limit`` multiply-adds an inverted file is used (``nlist ≈ 4√N``
cells, ``nprobe`` visited): ``IndexIVFFlat`` while a float32 copy of the base fits ``flat_bytes``, beyond that
``IndexIVFPQ`` (``D/8`` bytes a vector) whose ``4k`` candidates are re-ranked exactly against the base itself,
so memory stays near the base's own size. The recall@k of either is measured against exact search (blockwise
matrix products) on a sample of queries, so every result says how much it may have missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


def exact_top_k(queries: np.ndarray, base: np.ndarray, k: int, block: int = 131072) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by blockwise products over the base (no copy of it), for a modest number of queries."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for start in range(0, len(base), block):
        sims = q @ _as_float32(base, start, start + block).T
        both_s = np.concatenate([best_s, sims], axis=1)
        both_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + sims.shape[1]), sims.shape)], axis=1)
        top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(both_s, top, 1), np.take_along_axis(both_i, top, 1)
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
