"""Five-point landmarks supplied in a text file instead of a detector.

Two formats, told apart by the number of fields per line (whitespace separated, x and y interleaved, points in
image order: left eye, right eye, nose, left mouth corner, right mouth corner):

* SphereFace LFW ``lfw_landmark_5pt_sphereface.txt``: ``path x0 y0 ... x4 y4`` (11 fields);
* IJB-C ``ijbc_name_5pts_score.txt``: ``name x0 y0 ... x4 y4 faceness`` (12 fields).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from facepipe.types import Face


class LandmarksFileError(ValueError):
    """The landmarks file is missing or malformed (a fatal configuration error)."""


def read_landmarks_file(path: str | os.PathLike) -> dict[str, Face]:
    """``relative image path -> Face``. The box is NaN (a landmarks file gives none); the score is the faceness
    score where the file has one, else 1.0."""
    path = Path(path)
    if not path.is_file():
        raise LandmarksFileError(f"landmarks file not found: {path}")
    faces: dict[str, Face] = {}
    n_fields: int | None = None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (11, 12):
                raise LandmarksFileError(
                    f"{path}:{line_no}: expected 'name x0 y0 ... x4 y4 [score]' (11 or 12 fields), got {len(fields)}"
                )
            if n_fields is None:
                n_fields = len(fields)
            elif len(fields) != n_fields:
                raise LandmarksFileError(f"{path}:{line_no}: {len(fields)} fields where earlier lines have {n_fields}")
            try:
                values = np.array([float(v) for v in fields[1:]], dtype=np.float32)
            except ValueError:
                raise LandmarksFileError(f"{path}:{line_no}: non-numeric coordinate in {line.strip()!r}") from None
            name = fields[0][2:] if fields[0].startswith("./") else fields[0]
            if name in faces:
                raise LandmarksFileError(f"{path}:{line_no}: {name} listed twice")
            score = float(values[10]) if len(values) == 11 else 1.0
            faces[name] = Face(np.full(4, np.nan, np.float32), score, values[:10].reshape(5, 2), {"from": "landmarks-file"})
    if not faces:
        raise LandmarksFileError(f"landmarks file {path} is empty")
    return faces
