"""Which detected faces become crops: ``--keep largest|center|best|all``."""

from __future__ import annotations

from typing import Literal, Sequence

from facepipe.types import Face

KeepMode = Literal["largest", "center", "best", "all"]
KEEP_MODES: tuple[str, ...] = ("largest", "center", "best", "all")


def choose_faces(
    faces: Sequence[Face], image_shape: tuple[int, ...], keep: KeepMode = "largest", min_score: float = 0.0
) -> list[Face]:
    """Faces scoring at least ``min_score``, reduced to one by ``keep`` (``all`` keeps them all, best first).

    ``largest``: biggest box area; ``center``: box centre nearest the image centre (the subject of a
    centred portrait or of a loosely cropped data set); ``best``: highest detector score. Ties go to the
    earlier face (higher score), so the choice is deterministic.
    """
    if keep not in KEEP_MODES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    candidates = [face for face in faces if face.score >= min_score]
    if keep == "all" or not candidates:
        return sorted(candidates, key=lambda f: -f.score) if keep == "all" else []
    if keep == "best":
        return [max(candidates, key=lambda f: f.score)]
    if keep == "largest":
        return [max(candidates, key=lambda f: f.area)]
    cy, cx = image_shape[0] / 2.0, image_shape[1] / 2.0

    def distance(face: Face) -> float:
        fx, fy = face.center
        return (fx - cx) ** 2 + (fy - cy) ** 2

    return [min(candidates, key=distance)]
