"""The IJB-C / IJB-B meta files, read and checked: which images, in which templates and media, which pairs.

``<root>/meta/<target>_face_tid_mid.txt`` (``image template media``), ``<target>_name_5pts_score.txt`` (``image
x1 y1 .. x5 y5 faceness``, the same images in the same order: the reference zips the two files by line) and
``<target>_template_pair_label.txt`` (``template1 template2 label``); images under ``<root>/loose_crop``.

Every value is checked where it is read: a landmark or faceness that is NaN or infinite, a label other than 0/1,
a pair naming a template without images, or a blank line stops the run with one error naming the file and the
line (a NaN faceness would otherwise zero its template and report TAR 0.00; a NaN landmark fails deep inside
the alignment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TARGETS = ("IJBC", "IJBB")


class IJBMetaError(ValueError):
    """A meta file is missing, malformed, or holds a value the protocol cannot use (names file and line)."""


@dataclass(frozen=True)
class IJBLayout:
    """The meta data of IJB-C / IJB-B: one row per face image, plus the template pairs."""

    root: Path
    target: str
    image_names: np.ndarray  # (N,) str, file names under loose_crop/
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id of each image
    landmarks: np.ndarray  # (N, 5, 2) float32 in loose-crop pixels
    faceness: np.ndarray  # (N,) float32 detector score shipped with the data
    pair_t1: np.ndarray  # (P,) template id
    pair_t2: np.ndarray  # (P,) template id
    labels: np.ndarray  # (P,) int8, 1 genuine / 0 impostor

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"

    @property
    def num_images(self) -> int:
        return len(self.image_names)

    def image_paths(self, start: int, stop: int) -> list[str]:
        return [str(self.image_dir / name) for name in self.image_names[start:stop]]


def meta_paths(root: str | os.PathLike, target: str = "IJBC") -> dict[str, Path]:
    if target not in TARGETS:
        raise IJBMetaError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    meta = Path(root) / "meta"
    prefix = target.lower()
    return {
        "tid_mid": meta / f"{prefix}_face_tid_mid.txt",
        "landmarks": meta / f"{prefix}_name_5pts_score.txt",
        "pairs": meta / f"{prefix}_template_pair_label.txt",
    }


def _read_table(path: Path, dtypes: dict[int, Any], columns: int, described: str) -> pd.DataFrame:
    """Space-separated columns; blank lines are kept (as empty rows) so that row ``i`` is line ``i + 1``."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    try:
        table = pd.read_csv(path, sep=" ", header=None, dtype=dtypes, engine="c", skip_blank_lines=False)
    except (ValueError, pd.errors.ParserError) as error:
        raise IJBMetaError(f"{path}: not in the expected space-separated format of {described} ({error})") from error
    if table.shape[1] != columns:
        raise IJBMetaError(f"{path}: expected {columns} columns ({described}), found {table.shape[1]}")
    blank = table[0].isna().to_numpy()
    if blank.any():
        raise IJBMetaError(f"{path} line {int(np.flatnonzero(blank)[0]) + 1}: empty line; expected {described}")
    return table


def _check_finite(path: Path, values: np.ndarray, what: str) -> None:
    """One error naming the first line whose ``what`` is NaN or infinite."""
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        line = int(np.flatnonzero(bad)[0])
        raise IJBMetaError(
            f"{path} line {line + 1}: {what} is not a finite number ({values[line].reshape(-1).tolist()}); "
            f"{int(bad.sum())} line(s) like it; fix or remove them"
        )


def read_template_media(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``img tid mid`` lines -> (image names, template ids, media ids)."""
    table = _read_table(path, {0: str, 1: np.int64, 2: np.int64}, 3, "image template media")
    return table[0].to_numpy(dtype=object), table[1].to_numpy(), table[2].to_numpy()


def read_landmarks(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``img x1 y1 .. x5 y5 faceness`` lines -> (image names, (N,5,2) float32, (N,) float32), all finite."""
    table = _read_table(path, {0: str, **{i: np.float32 for i in range(1, 12)}}, 12, "image, 10 coordinates, faceness")
    landmarks = table.iloc[:, 1:11].to_numpy(dtype=np.float32).reshape(-1, 5, 2)
    faceness = table[11].to_numpy(dtype=np.float32)
    _check_finite(path, landmarks, "a landmark coordinate")
    _check_finite(path, faceness, "the faceness score")
    return table[0].to_numpy(dtype=object), landmarks, faceness


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``t1 t2 label`` lines -> (t1, t2, label int8)."""
    table = _read_table(path, {0: np.int64, 1: np.int64, 2: np.int64}, 3, "template1 template2 label")
    labels = table[2].to_numpy()
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        line = int(np.flatnonzero(bad)[0])
        raise IJBMetaError(f"{path} line {line + 1}: label {labels[line]}; labels must be 0 or 1")
    return table[0].to_numpy(), table[1].to_numpy(), labels.astype(np.int8)


def read_ijb_layout(root: str | os.PathLike, target: str = "IJBC") -> IJBLayout:
    """Read ``<root>/meta/<target>_*.txt``; images are expected under ``<root>/loose_crop``."""
    paths = meta_paths(root, target)
    names, templates, medias = read_template_media(paths["tid_mid"])
    lmk_names, landmarks, faceness = read_landmarks(paths["landmarks"])
    if len(names) != len(lmk_names) or not np.array_equal(names, lmk_names):
        differ = next((i for i, (a, b) in enumerate(zip(names, lmk_names)) if a != b), min(len(names), len(lmk_names)))
        raise IJBMetaError(
            f"{paths['tid_mid'].name} and {paths['landmarks'].name} do not list the same images in the same order "
            f"(first difference at line {differ + 1})"
        )
    t1, t2, labels = read_pairs(paths["pairs"])
    known = np.unique(templates)
    for column, ids in (("first", t1), ("second", t2)):
        missing = ~np.isin(ids, known)
        if missing.any():
            line = int(np.flatnonzero(missing)[0])
            raise IJBMetaError(
                f"{paths['pairs']} line {line + 1}: {int(missing.sum())} pairs name a {column} template with no images, "
                f"e.g. {ids[line]}"
            )
    return IJBLayout(Path(root), target, names, templates, medias, landmarks, faceness, t1, t2, labels)
