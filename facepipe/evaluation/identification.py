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

Rows that are not ``ok``, non-finite and zero vectors are left out and counted; a probe or non-mated folder made
with another model, weights or dimension than the gallery is refused (``facepipe.audit.data.check_same_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.audit.data import AuditInputError, EmbeddingSet, check_same_model, load_embedding_folder
from facepipe.embedding.base import l2_normalize
from facepipe.evaluation.ijbc_1n import RANKS, Searches, cmc, tpir_at_fpir


class IdentificationInputError(ValueError):
    """A folder is not an embedding folder, is empty, or was made with another model."""


def load_set(emb_dir: str | Path) -> EmbeddingSet:
    """The usable rows of an embedding folder, normalised (the audit's loader: error rows, non-finite and zero
    vectors are skipped and counted)."""
    try:
        return load_embedding_folder(emb_dir, name=str(emb_dir))
    except AuditInputError as exc:
        raise IdentificationInputError(str(exc)) from None


def _identities(data: EmbeddingSet) -> np.ndarray:
    return np.array(data.names, dtype=object)[data.identity]


def gallery_templates(gallery: EmbeddingSet) -> tuple[np.ndarray, np.ndarray]:
    """(identities, (I, D) unit templates): the normalised mean embedding of each identity."""
    names, codes = np.unique(_identities(gallery), return_inverse=True)
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
    others = [probes] + ([load_set(non_mated_dir)] if non_mated_dir is not None else [])
    try:
        for other in others:  # another model's cosines mean nothing against this gallery
            check_same_model(gallery, other, role="gallery")
    except AuditInputError as exc:
        raise IdentificationInputError(str(exc)) from None
    names, templates = gallery_templates(gallery)
    vectors, identities = np.asarray(probes.vectors, np.float32), _identities(probes)
    if non_mated_dir is not None:
        extra = others[1]
        vectors = np.concatenate([vectors, np.asarray(extra.vectors, np.float32)])
        identities = np.concatenate([identities, np.full(len(extra.vectors), "\0non-mated", dtype=object)])
    skipped = sum(sum(data.skipped.values()) for data in [gallery, *others])
    searches = search(vectors, identities, names, templates)
    tpir, thresholds = tpir_at_fpir(searches)
    counts = {"gallery_identities": len(names), "gallery_images": len(gallery.vectors), "mated_searches": int(searches.mated.sum()),
              "non_mated_searches": int((~searches.mated).sum()), "skipped_rows": skipped}
    return IdentificationReport(cmc(searches), tpir, thresholds, counts)
