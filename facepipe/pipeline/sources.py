"""Where the images of an align job come from: a directory tree, a file list, or an MXNet RecordIO.

A source enumerates lightweight, picklable ``Item``s in a fixed order (so chunk boundaries are stable across
reruns) and ``read(item)`` returns the item's encoded bytes. Sources are picklable (no open files), so worker
processes and Ray tasks can call ``read`` themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from facepipe.io.images import list_images, read_image_bytes
from facepipe.io.recordio import RecordIOReader


@dataclass(frozen=True)
class Item:
    """One input. ``key`` is its relative POSIX path (what outputs mirror and landmark files name);
    ``source`` is what the manifest records (a file path, or ``train.rec#123``); ``label`` an identity
    index when the source knows it (RecordIO), else -1."""

    index: int
    key: str
    source: str
    label: int = -1

    @property
    def identity(self) -> str:
        return identity_of(self.key)


def identity_of(rel_path: str) -> str:
    """The identity of an image or crop at ``rel_path`` (relative, POSIX): its whole parent folder path
    (``set1/alice`` for ``set1/alice/001.jpg``; ``''`` at the top level). The whole path, not the last folder,
    so that two folders of the same name under different parents stay two identities; align's labels, the
    embedding manifest and galleries all use this one rule."""
    parent = str(PurePosixPath(rel_path).parent)
    return "" if parent == "." else parent


class Source(Protocol):
    description: str

    def items(self) -> list[Item]: ...

    def read(self, item: Item) -> bytes: ...


class SourceError(ValueError):
    """A fatal configuration error about the input (missing, empty, unreadable list)."""


class FileSource:
    """Images on disk, named by their path relative to ``root``."""

    def __init__(self, paths: list[Path], root: Path, description: str) -> None:
        self.root = root
        self.description = description
        self._paths = paths

    def items(self) -> list[Item]:
        return [
            Item(i, Path(os.path.relpath(path, self.root)).as_posix(), str(path)) for i, path in enumerate(self._paths)
        ]

    def read(self, item: Item) -> bytes:
        return read_image_bytes(item.source)


def directory_source(root: str | os.PathLike) -> FileSource:
    """Every image under ``root`` (jpg, png, bmp, webp, tif; recursive, sorted; broken symlinks included so they
    are reported)."""
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        raise SourceError(f"input not found: {root}")
    if root.is_file():
        return FileSource([root], root.parent, str(root))
    paths = list_images(root)
    if not paths:
        raise SourceError(f"no images (jpg, jpeg, png, bmp, webp, tif) under {root}")
    return FileSource(paths, root, str(root))


def file_list_source(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> FileSource:
    """Paths listed one per line in a text file (blank lines and ``#`` comments skipped).

    Relative paths are relative to ``root`` (default: the list file's folder); items are named relative to
    ``root``, or to the common folder of the listed paths when some lie outside it.
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise SourceError(f"file list not found: {list_file}")
    base = Path(root) if root is not None else list_file.parent
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            path = Path(line)
            paths.append(path if path.is_absolute() else base / path)
    if not paths:
        raise SourceError(f"file list {list_file} names no images")
    absolute = [os.path.abspath(p) for p in paths]
    name_root = os.path.abspath(base)
    if not all(p.startswith(name_root + os.sep) for p in absolute):
        name_root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    return FileSource(paths, Path(name_root), str(list_file))


class RecordIOSource:
    """Image records of an insightface ``train.rec``; items are named ``<identity>/<key>.jpg`` so that a mirrored
    output keeps identity folders. The identity is the name ``labels.tsv`` beside the file gives the record's
    label (what ``align --sink recordio`` writes), else the label number."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        try:
            self.reader = RecordIOReader(rec_path, idx_path)
        except FileNotFoundError as exc:
            raise SourceError(str(exc)) from None
        self.description = str(rec_path)
        self.names = self.label_names(Path(rec_path).with_name("labels.tsv"))

    @staticmethod
    def label_names(path: Path) -> dict[int, str]:
        """``label -> identity`` from a ``labels.tsv`` (``<label><TAB><identity>`` lines); empty when there is none."""
        if not path.is_file():
            return {}
        names: dict[int, str] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            label, sep, identity = line.partition("\t")
            if not sep or not label.strip().lstrip("-").isdigit():
                raise SourceError(f"{path}:{number}: expected '<label><TAB><identity>', got {line!r}")
            names[int(label)] = identity
        return names

    def items(self) -> list[Item]:
        items = []
        for index, key in enumerate(self.reader.image_keys()):
            header, _ = self.reader.read_image_record(key)
            label = int(header.label[0])
            identity = self.names.get(label, str(label))
            name = f"{identity}/{key}.jpg" if identity else f"{key}.jpg"
            items.append(Item(index, name, f"{self.reader.rec_path}#{key}", label))
        return items

    def read(self, item: Item) -> bytes:
        key = int(item.source.rsplit("#", 1)[1])
        return self.reader.read_image_record(key)[1]


def open_source(input_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Source:
    """Pick the source from the input: a ``.rec`` file, a ``.txt``/``.lst`` file list, or a directory / image."""
    path = Path(input_path)
    if path.suffix == ".rec":
        return RecordIOSource(path)
    if path.suffix in (".txt", ".lst") and path.is_file():
        return file_list_source(path, root)
    return directory_source(path)
