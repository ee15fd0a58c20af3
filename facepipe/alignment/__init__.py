"""Similarity-transform alignment of five landmarks onto the ArcFace template."""

from facepipe.alignment.similarity import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    arcface_template,
    estimate_norm,
    norm_crop,
    umeyama_similarity,
    warp_crops,
)

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "align_faces",
    "arcface_template",
    "estimate_norm",
    "norm_crop",
    "umeyama_similarity",
    "warp_crops",
]
