"""A small IJB-C-format data set made from the real CFP images, to run the IJB-C protocol end to end.

CFP identities become subjects. Each subject gets three templates built from its 10 frontal and 4 profile
images (shuffled with a seed): a frontal gallery template, a profile-only probe template and a mixed probe
template, each made of several media: multi-image media stand for video frames, single-image media for stills,
frontal and profile views in separate media.
The CFP images are already loose face crops, so they are the ``loose_crop`` images (linked or copied). Five
points and faceness scores come from a real detector run on each image (the largest face). As in IJB-C 1:1, pairs
are every gallery template against every probe template, genuine when the subjects agree. For 1:N, the gallery
templates of even-numbered subjects form gallery G1 (IJB-B: S1), the others G2 (S2), and every probe template is
in the mixed probe set.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from facepipe.evaluation.ijbc_1n import GALLERY_FILES, protocol_paths
from facepipe.faces import choose_faces, detect_padded
from facepipe.io.atomic import atomic_path
from facepipe.io.images import read_image

# (template kind, media as (view, slice of the shuffled view's images)); 10 frontal + 4 profile per subject.
# The profile-only probe is the hard case (frontal gallery vs profile probe, as in CFP-FP).
TEMPLATE_PLAN: tuple[tuple[str, tuple[tuple[str, slice], ...]], ...] = (
    ("gallery", (("frontal", slice(0, 3)), ("frontal", slice(3, 4)), ("frontal", slice(4, 5)))),
    ("probe", (("profile", slice(0, 2)), ("profile", slice(2, 3)))),
    ("probe", (("frontal", slice(5, 8)), ("frontal", slice(8, 10)), ("profile", slice(3, 4)))),
)


@dataclass(frozen=True)
class MiniIJBStats:
    subjects: int
    images: int
    templates: int
    pairs: int
    genuine_pairs: int
    undetected_images: int


def cfp_subjects(cfp_root: str | os.PathLike) -> list[tuple[str, list[Path], list[Path]]]:
    """``[(subject, frontal images, profile images)]`` from ``<cfp_root>/Data/Images/NNN/{frontal,profile}``."""
    images = Path(cfp_root) / "Data" / "Images"
    if not images.is_dir():
        raise FileNotFoundError(f"not a CFP data set (no Data/Images): {cfp_root}")
    subjects = []
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        frontal = sorted((folder / "frontal").glob("*.jpg"))
        profile = sorted((folder / "profile").glob("*.jpg"))
        if len(frontal) != 10 or len(profile) != 4:
            raise ValueError(f"{folder}: expected 10 frontal and 4 profile images, found {len(frontal)} and {len(profile)}")
        subjects.append((folder.name, frontal, profile))
    if not subjects:
        raise FileNotFoundError(f"no subjects under {images}")
    return subjects


def detect_five_points(paths: Sequence[Path], detector: Any, batch_size: int = 16, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Largest face per image: ``(N, 5, 2)`` landmarks and ``(N,)`` scores; NaN rows where nothing was found."""
    landmarks = np.full((len(paths), 5, 2), np.nan, dtype=np.float32)
    scores = np.full(len(paths), np.nan, dtype=np.float32)
    for start in tqdm(range(0, len(paths), batch_size), desc="five points", unit="batch", disable=not progress):
        batch = [read_image(p) for p in paths[start : start + batch_size]]
        for offset, (image, faces) in enumerate(zip(batch, detect_padded(detector, batch))):
            chosen = choose_faces(faces, image.shape, keep="largest")
            if chosen:
                landmarks[start + offset] = chosen[0].landmarks
                scores[start + offset] = chosen[0].score
    return landmarks, scores


def build_mini_ijbc(
    cfp_root: str | os.PathLike,
    out_root: str | os.PathLike,
    detector: Any,
    num_subjects: int | None = None,
    seed: int = 0,
    target: str = "IJBC",
    copy: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> MiniIJBStats:
    """Write ``<out_root>/loose_crop/<k>.jpg`` and ``<out_root>/meta/<target>_*.txt``; refuses a non-empty folder."""
    out_root = Path(out_root)
    if out_root.exists() and any(out_root.iterdir()):
        raise FileExistsError(f"{out_root} is not empty")
    rng = np.random.default_rng(seed)
    subjects = cfp_subjects(cfp_root)[:num_subjects]

    rows: list[tuple[Path, int, int, int]] = []  # (source image, template id, media id, subject index)
    templates: list[tuple[int, str, int]] = []  # (template id, kind, subject index)
    template_id, media_id = 0, 0
    for subject_index, (_, frontal, profile) in enumerate(subjects):
        views = {"frontal": [frontal[i] for i in rng.permutation(10)], "profile": [profile[i] for i in rng.permutation(4)]}
        for kind, media in TEMPLATE_PLAN:
            template_id += int(rng.integers(1, 4))  # ids are not contiguous in IJB-C either
            templates.append((template_id, kind, subject_index))
            for view, part in media:
                media_id += int(rng.integers(1, 3))
                rows += [(path, template_id, media_id, subject_index) for path in views[view][part]]

    landmarks, scores = detect_five_points([r[0] for r in rows], detector, batch_size, progress)
    detected = ~np.isnan(scores)
    rows = [r for r, ok in zip(rows, detected) if ok]
    landmarks, scores = landmarks[detected], scores[detected]
    present = {r[1] for r in rows}
    gallery = [(t, s) for t, kind, s in templates if kind == "gallery" and t in present]
    probes = [(t, s) for t, kind, s in templates if kind == "probe" and t in present]

    crops = out_root / "loose_crop"
    meta = out_root / "meta"
    crops.mkdir(parents=True, exist_ok=True)
    meta.mkdir(parents=True, exist_ok=True)
    names = [f"{k}.jpg" for k in range(1, len(rows) + 1)]
    for name, (source, *_) in zip(names, rows):
        if copy:
            shutil.copyfile(source, crops / name)
        else:
            os.symlink(Path(source).resolve(), crops / name)
    prefix = target.lower()
    _write_lines(meta / f"{prefix}_face_tid_mid.txt", (f"{n} {t} {m}" for n, (_, t, m, _) in zip(names, rows)))
    _write_lines(
        meta / f"{prefix}_name_5pts_score.txt",
        (f"{n} " + " ".join(f"{v:.2f}" for v in lmk.reshape(-1)) + f" {s:.6f}" for n, lmk, s in zip(names, landmarks, scores)),
    )
    pairs = [(g, p, int(gs == ps)) for g, gs in gallery for p, ps in probes]
    _write_lines(meta / f"{prefix}_template_pair_label.txt", (f"{a} {b} {c}" for a, b, c in pairs))
    _write_1n_files(meta, target, names, rows, gallery, probes)
    return MiniIJBStats(
        subjects=len(subjects),
        images=len(rows),
        templates=len(present),
        pairs=len(pairs),
        genuine_pairs=sum(c for *_, c in pairs),
        undetected_images=int((~detected).sum()),
    )


def _write_1n_files(
    meta: Path, target: str, names: list[str], rows: list[tuple[Path, int, int, int]],
    gallery: list[tuple[int, int]], probes: list[tuple[int, int]],
) -> None:
    """The 1:N files: two galleries with disjoint subjects (even / odd subject index, as IJB-C's G1 / G2 split its
    subjects), and every probe template in the mixed probe set (mated in one gallery, non-mated in the other)."""
    images_of: dict[int, list[str]] = {}
    for name, (_, template, _, _) in zip(names, rows):
        images_of.setdefault(template, []).append(name)
    paths = protocol_paths(meta.parent, target)  # the reader's names, so the two cannot drift apart
    first, second = GALLERY_FILES[target]
    sets = {
        paths[first]: [(t, s) for t, s in gallery if s % 2 == 0],
        paths[second]: [(t, s) for t, s in gallery if s % 2 == 1],
        paths["probe"]: probes,
    }
    for path, templates in sets.items():
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME"]
        lines += [f"{t},{s + 1},{image}" for t, s in templates for image in images_of[t]]
        _write_lines(path, lines)


def _write_lines(path: Path, lines) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        for line in lines:
            handle.write(line + "\n")
