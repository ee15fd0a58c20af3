"""Face embedders behind one interface: ``embed(crops) -> (N, D)`` raw embeddings."""

from facepipe.embedding.base import EMBEDDER_NAMES, Embedder, create_embedder, l2_normalize

__all__ = ["EMBEDDER_NAMES", "Embedder", "create_embedder", "l2_normalize"]
