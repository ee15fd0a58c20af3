"""facepipe: RetinaFace detection, ArcFace alignment and embedding, and face recognition evaluation."""

from facepipe.types import Face

__all__ = ["Face"]
__version__ = "0.1.0"
