"""FAISS galleries: build from embedding folders, search with images, crops or embeddings."""

from facepipe.index.gallery import INDEX_TYPES, Gallery, GalleryError, GalleryInfo, IndexParams, build_gallery, recall_at_k

__all__ = ["INDEX_TYPES", "Gallery", "GalleryError", "GalleryInfo", "IndexParams", "build_gallery", "recall_at_k"]
