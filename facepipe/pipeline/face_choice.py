"""Which detected faces become crops: ``--keep largest|center|best|all``."""

from __future__ import annotations

from typing import Literal, Sequence

from facepipe.types import Face

KeepMode = Literal["largest", "center", "best", "all", "insightface"]
KEEP_MODES: tuple[str, ...] = ("largest", "center", "best", "all", "insightface")


def choose_faces(
    faces: Sequence[Face], image_shape: tuple[int, ...], keep: KeepMode = "largest", min_score: float = 0.0
) -> list[Face]:
    """Faces scoring at least ``min_score``, reduced to one by ``keep`` (``all`` keeps them all, best first).

    ``largest``: biggest box area; ``center``: box centre nearest the image centre (the subject of a
    centred portrait or of a loosely cropped data set); ``best``: highest detector score; ``insightface``:
    the rule of insightface's evaluation scripts and ``FaceAnalysis(max_num=1)``, largest ``area − 2 ×
    (squared distance of the box centre from the image centre)``, which prefers a big face near the middle.
    Ties go to the earlier face (higher score), so the choice is deterministic.
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
    if keep == "insightface":

        def value(face: Face) -> float:
            fx, fy = face.center
            return face.area - 2.0 * ((fx - cx) ** 2 + (fy - cy) ** 2)

        return [max(candidates, key=value)]

    def distance(face: Face) -> float:
        fx, fy = face.center
        return (fx - cx) ** 2 + (fy - cy) ** 2

    return [min(candidates, key=distance)]
