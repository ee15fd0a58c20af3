"""1:N identification on your own embedding folders: the IJB-C 1:N figures (CMC, TPIR@FPIR) at gallery scale.

Protocol (the definitions of ``facepipe.evaluation.ijbc_1n``, on facepipe embedding folders, identity = folder):

* **gallery**: one template per identity, the L2-normalised mean of its (normalised) embeddings;
* **probes**: every image of the probe folder is one search, **mated** when its identity has a gallery template,
  **non-mated** otherwise; every image of the optional ``non_mated`` folder is a non-mated search whatever its
  folder name (a set of people known to be absent);
* each search takes the ``max(RANKS)`` most similar templates from a FAISS inner-product index (exact); the
  mate's score is computed directly, so its rank is exact up to ``max(RANKS)`` and "beyond" after it;
* **CMC** at ranks 1, 5, 10, 20 over mated searches; **TPIR at FPIR** 0.01 and 0.1 with the NIST thresholds
  (``ijbc_1n.tpir_at_fpir``), non-mated scores = each non-mated search's best template score.

Rows that are not ``ok`` and zero vectors are left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.embedding.base import l2_normalize
from facepipe.evaluation.ijbc_1n import RANKS, Searches, cmc, tpir_at_fpir


class IdentificationInputError(ValueError):
    """A folder is not an embedding folder, is empty, or was made with another model."""


@dataclass
class FolderSet:
    vectors: np.ndarray  # (N, D) float32 unit rows
    identities: np.ndarray  # (N,) object
    skipped: int


def load_set(emb_dir: str | Path) -> FolderSet:
    """The usable rows of an embedding folder, normalised."""
    from facepipe.embedding.store import EmbeddingStoreError, load_embeddings

    try:
        matrix, manifest = load_embeddings(emb_dir)
    except EmbeddingStoreError as exc:
        raise IdentificationInputError(str(exc)) from None
    matrix = np.asarray(matrix, dtype=np.float32)
    ok = (manifest["status"] == "ok").to_numpy() & np.isfinite(matrix).all(axis=1) & (np.abs(matrix).sum(axis=1) > 0)
    if not ok.any():
        raise IdentificationInputError(f"{emb_dir}: no usable embeddings")
    return FolderSet(l2_normalize(matrix[ok]).astype(np.float32), manifest["identity"].to_numpy(dtype=object)[ok], int((~ok).sum()))


def gallery_templates(gallery: FolderSet) -> tuple[np.ndarray, np.ndarray]:
    """(identities, (I, D) unit templates): the normalised mean embedding of each identity."""
    names, codes = np.unique(gallery.identities, return_inverse=True)
    sums = np.zeros((len(names), gallery.vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, gallery.vectors)
    return names, l2_normalize(sums).astype(np.float32)


def search(probes: np.ndarray, probe_ids: np.ndarray, names: np.ndarray, templates: np.ndarray, depth: int = max(RANKS)) -> Searches:
    """Each probe against the templates: top ``depth`` by FAISS, the mate's score and rank exactly."""
    import faiss

    index = faiss.IndexFlatIP(templates.shape[1])
    index.add(np.ascontiguousarray(templates))
    k = min(depth, len(templates))
    scores, ids = index.search(np.ascontiguousarray(probes), k)
    position = {name: i for i, name in enumerate(names)}
    mate = np.array([position.get(identity, -1) for identity in probe_ids])
    mated = mate >= 0
    mate_score = np.full(len(probes), -np.inf)
    mate_score[mated] = np.einsum("ij,ij->i", probes[mated].astype(np.float64), templates[mate[mated]].astype(np.float64))
    # rank = 1 + non-mate templates scoring at least the mate (ties count against it): exact while the mate is
    # within the top k (all of them when the gallery is that small), "beyond" (depth + 1) otherwise
    beats = (scores >= mate_score[:, None] - 1e-6) & (ids != mate[:, None]) & (ids >= 0)
    beyond = mate_score < scores[:, -1] - 1e-6
    rank = np.where(mated, np.where(beyond, depth + 1, 1 + beats.sum(axis=1)), 0)
    return Searches(mated, rank.astype(np.int64), mate_score, scores[:, 0].astype(np.float64))


@dataclass
class IdentificationReport:
    cmc: dict[str, float]
    tpir: dict[str, float]
    thresholds: dict[str, float]
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"CMC": self.cmc, "TPIR@FPIR": self.tpir, "thresholds": self.thresholds, "counts": self.counts}


def identify(gallery_dir: str | Path, probe_dir: str | Path, non_mated_dir: str | Path | None = None) -> IdentificationReport:
    """The protocol of the module docstring on three embedding folders."""
    gallery, probes = load_set(gallery_dir), load_set(probe_dir)
    if gallery.vectors.shape[1] != probes.vectors.shape[1]:
        raise IdentificationInputError(f"{probe_dir}: {probes.vectors.shape[1]}-d embeddings, the gallery's are {gallery.vectors.shape[1]}-d")
    names, templates = gallery_templates(gallery)
    vectors, identities, skipped = probes.vectors, probes.identities, probes.skipped + gallery.skipped
    if non_mated_dir is not None:
        extra = load_set(non_mated_dir)
        if extra.vectors.shape[1] != gallery.vectors.shape[1]:
            raise IdentificationInputError(f"{non_mated_dir}: another embedding size than the gallery's")
        vectors = np.concatenate([vectors, extra.vectors])
        identities = np.concatenate([identities, np.full(len(extra.vectors), "\0non-mated", dtype=object)])
        skipped += extra.skipped
    searches = search(vectors, identities, names, templates)
    tpir, thresholds = tpir_at_fpir(searches)
    counts = {"gallery_identities": len(names), "gallery_images": len(gallery.vectors), "mated_searches": int(searches.mated.sum()),
              "non_mated_searches": int((~searches.mated).sum()), "skipped_rows": skipped}
    return IdentificationReport(cmc(searches), tpir, thresholds, counts)
