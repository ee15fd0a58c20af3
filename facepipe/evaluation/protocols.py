"""Pair lists of the raw-image verification protocols: CFP (FF / FP) and LFW ``pairs.txt``.

Both give pairs in official folds. ``PairList`` keeps pairs ordered by fold and, inside a fold, alternates
same / different pairs, so that (a) the official folds are the evaluation folds and (b) taking the first ``N``
pairs of a fold (``limit``) keeps it balanced. Accuracy does not depend on the order inside a fold.

CFP layout (``cfp-dataset/``): ``Protocol/Pair_list_{F,P}.txt`` map numbers to image paths relative to
``Protocol/`` (``1 ../Data/Images/001/frontal/01.jpg``), ``Protocol/Split/{FF,FP}/01..10/{same,diff}.txt`` hold
``a,b`` number pairs (FF: frontal, frontal; FP: frontal, profile).

LFW ``pairs.txt``: a header ``n_sets n_per_set`` (or ``n`` for one set, as ``pairsDevTrain.txt``), then per set
``n`` same lines ``name i j`` and ``n`` different lines ``name1 i name2 j``; image ``i`` of ``name`` is
``<root>/<name>/<name>_<i:04d>.jpg``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from facepipe.io.files import MiB, FileReadError, read_text_bounded

CFP_PROTOCOLS = ("FF", "FP")


class ProtocolError(ValueError):
    """A protocol file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True)
class PairList:
    """Verification pairs: paths of both sides, labels and the official fold of each pair."""

    left: tuple[Path, ...]
    right: tuple[Path, ...]
    issame: np.ndarray  # (P,) bool
    fold: np.ndarray  # (P,) int, official fold number (1-based)

    def __len__(self) -> int:
        return len(self.left)

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in np.unique(self.fold))

    def unique_paths(self) -> list[Path]:
        """Every image once, in first-use order."""
        return list(dict.fromkeys([*self.left, *self.right]))

    def missing_paths(self) -> list[Path]:
        return [p for p in self.unique_paths() if not p.is_file()]

    def subset(self, folds: Iterable[int] | None = None, limit: int | None = None) -> "PairList":
        """Pairs of the given folds, at most ``limit`` per fold (the first ones: balanced, see module doc)."""
        wanted = self.folds if folds is None else sorted(set(int(f) for f in folds))
        unknown = set(wanted) - set(self.folds)
        if unknown:
            raise ProtocolError(f"unknown fold(s) {sorted(unknown)}; available: {self.folds}")
        keep: list[int] = []
        for fold in wanted:
            indices = np.flatnonzero(self.fold == fold)
            keep.extend(indices[:limit] if limit is not None else indices)
        return self._take(np.asarray(keep, dtype=np.int64))

    def _take(self, indices: np.ndarray) -> "PairList":
        return PairList(
            left=tuple(self.left[i] for i in indices),
            right=tuple(self.right[i] for i in indices),
            issame=self.issame[indices],
            fold=self.fold[indices],
        )


def _interleave(same: Sequence, diff: Sequence) -> list[tuple[object, bool]]:
    """same[0], diff[0], same[1], diff[1], ... then whatever is left of the longer list."""
    out: list[tuple[object, bool]] = []
    for i in range(max(len(same), len(diff))):
        if i < len(same):
            out.append((same[i], True))
        if i < len(diff):
            out.append((diff[i], False))
    return out


def _build(rows: list[tuple[Path, Path, bool, int]]) -> PairList:
    return PairList(
        left=tuple(r[0] for r in rows),
        right=tuple(r[1] for r in rows),
        issame=np.array([r[2] for r in rows], dtype=bool),
        fold=np.array([r[3] for r in rows], dtype=np.int64),
    )


MAX_PROTOCOL_BYTES = 256 * MiB  # LFW pairs.txt is 130 KB


def _read_lines(path: Path) -> list[str]:
    """Non-blank lines; blank lines are dropped, so error messages count only non-blank lines."""
    try:
        text = read_text_bounded(path, MAX_PROTOCOL_BYTES)
    except FileReadError as exc:
        if str(exc) == "file not found":
            raise ProtocolError(f"protocol file not found: {path}") from None
        raise ProtocolError(f"{path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


_NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() accepts '²', which int() refuses


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text) is not None


def _read_cfp_image_list(path: Path) -> dict[int, Path]:
    images: dict[int, Path] = {}
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if len(parts) != 2 or not _is_number(parts[0]):
            raise ProtocolError(f"{path}:{number}: expected 'N relative/path.jpg', got {line!r}")
        images[int(parts[0])] = (path.parent / parts[1]).resolve()
    return images


def _read_cfp_number_pairs(path: Path) -> list[tuple[int, int]]:
    pairs = []
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.replace(",", " ").split()
        if len(parts) != 2 or not all(_is_number(p) for p in parts):
            raise ProtocolError(f"{path}:{number}: expected 'a,b', got {line!r}")
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def cfp_protocol_root(root: str | os.PathLike) -> Path:
    """Accept the data set folder (with ``Protocol/``) or the ``Protocol`` folder itself."""
    root = Path(root)
    if (root / "Protocol" / "Split").is_dir():
        return root / "Protocol"
    if (root / "Split").is_dir():
        return root
    raise ProtocolError(f"{root}: not a CFP data set (no Protocol/Split folder)")


def read_cfp_pairs(root: str | os.PathLike, protocol: str) -> PairList:
    """All 10 splits of CFP ``FF`` or ``FP`` (7000 pairs), ordered by split, same/diff alternating."""
    if protocol not in CFP_PROTOCOLS:
        raise ProtocolError(f"unknown CFP protocol {protocol!r}; choose FF or FP")
    protocol_dir = cfp_protocol_root(root)
    frontal = _read_cfp_image_list(protocol_dir / "Pair_list_F.txt")
    second = frontal if protocol == "FF" else _read_cfp_image_list(protocol_dir / "Pair_list_P.txt")
    splits = protocol_dir / "Split" / protocol
    split_dirs = sorted(d for d in splits.iterdir() if d.is_dir() and _is_number(d.name)) if splits.is_dir() else []
    if not split_dirs:
        raise ProtocolError(f"{protocol_dir / 'Split' / protocol}: no split folders")
    rows: list[tuple[Path, Path, bool, int]] = []
    for split_dir in split_dirs:
        same = _read_cfp_number_pairs(split_dir / "same.txt")
        diff = _read_cfp_number_pairs(split_dir / "diff.txt")
        for (a, b), issame in _interleave(same, diff):  # type: ignore[misc]
            try:
                rows.append((frontal[a], second[b], issame, int(split_dir.name)))
            except KeyError as exc:
                raise ProtocolError(f"{split_dir}: image number {exc.args[0]} not in the pair list") from None
    return _build(rows)


def lfw_image_path(root: Path, name: str, number: int, ext: str = ".jpg") -> Path:
    return root / name / f"{name}_{number:04d}{ext}"


def read_lfw_pairs(pairs_file: str | os.PathLike, root: str | os.PathLike, ext: str = ".jpg") -> PairList:
    """LFW pairs (6000 for the official ``pairs.txt``), ordered by set, same/diff alternating."""
    pairs_file = Path(pairs_file)
    root = Path(root)
    lines = _read_lines(pairs_file)
    if not lines:
        raise ProtocolError(f"{pairs_file}: empty")
    header = lines[0].split()
    if not 1 <= len(header) <= 2 or not all(_is_number(h) for h in header):
        raise ProtocolError(f"{pairs_file}:1: expected a header 'n_sets n_per_set' or 'n', got {lines[0]!r}")
    n_sets, per_set = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    expected = 1 + n_sets * 2 * per_set
    if len(lines) != expected:
        raise ProtocolError(f"{pairs_file}: header says {n_sets} x (2 x {per_set}) pairs, file has {len(lines) - 1} lines")
    rows: list[tuple[Path, Path, bool, int]] = []
    cursor = 1
    for fold in range(1, n_sets + 1):
        same, diff = [], []
        for _ in range(per_set):
            parts = lines[cursor].split()
            if len(parts) != 3 or not (_is_number(parts[1]) and _is_number(parts[2])):
                raise ProtocolError(f"{pairs_file}:{cursor + 1}: expected a same pair 'name i j', got {lines[cursor]!r}")
            same.append((lfw_image_path(root, parts[0], int(parts[1]), ext), lfw_image_path(root, parts[0], int(parts[2]), ext)))
            cursor += 1
        for _ in range(per_set):
            parts = lines[cursor].split()
            if len(parts) != 4 or not (_is_number(parts[1]) and _is_number(parts[3])):
                raise ProtocolError(
                    f"{pairs_file}:{cursor + 1}: expected a different pair 'name1 i name2 j', got {lines[cursor]!r}"
                )
            diff.append((lfw_image_path(root, parts[0], int(parts[1]), ext), lfw_image_path(root, parts[2], int(parts[3]), ext)))
            cursor += 1
        for (a, b), issame in _interleave(same, diff):  # type: ignore[misc]
            rows.append((a, b, issame, fold))
    return _build(rows)
