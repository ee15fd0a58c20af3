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

from facepipe.io.files import GiB, FileReadError, os_path_of, printable_path, read_file_bounded, read_text_bounded
from facepipe.io.images import ImageDecodeError, read_image_bytes, scan_images
from facepipe.io.recordio import RecordIOError, RecordIOReader


def identity_of(rel_path: str) -> str:
    """The identity of an input named by its relative POSIX path: its whole parent path, '' at the top level.

    ``set1/alice/01.jpg`` is identity ``set1/alice``, not ``alice``: two sets may both hold an ``alice`` who are
    different people, and the parent path is what an aligned output tree mirrors. Every part of facepipe that
    groups inputs by identity (align's labels, the embedding store) uses this one rule.
    """
    parent = str(PurePosixPath(rel_path).parent)
    return "" if parent == "." else parent


@dataclass(frozen=True)
class Item:
    """One input. ``key`` is its relative POSIX path (what outputs mirror and landmark files name);
    ``source`` is what the manifest records (a file path, or ``train.rec#123``); ``label`` an identity
    index when the source knows it (RecordIO), else -1. File names that are not UTF-8 appear in ``key`` and
    ``source`` with ``\\xNN`` escapes (``facepipe.io.files.printable_path``), so manifests can hold them."""

    index: int
    key: str
    source: str
    label: int = -1

    @property
    def identity(self) -> str:
        """The identity of the item: ``identity_of(key)``."""
        return identity_of(self.key)


class Source(Protocol):
    description: str

    def items(self) -> list[Item]: ...

    def read(self, item: Item) -> bytes: ...


MAX_LIST_BYTES = 4 * GiB  # a list of 40 million paths


class SourceError(ValueError):
    """A fatal configuration error about the input (missing, empty, unreadable list)."""


class FileSource:
    """Images on disk, named by their path relative to ``root``.

    ``unlisted`` maps folders that could not be listed to the reason: each becomes an item whose ``read`` raises
    that reason, so the run records an ``error`` row for it instead of losing its images silently. ``read``
    reads only regular files, within ``read_image_bytes``'s byte cap: a FIFO or device named like an image
    gives an error row, never a hang.
    """

    def __init__(self, paths: list[Path], root: Path, description: str, unlisted: dict[Path, str] | None = None) -> None:
        self.root = root
        self.description = description
        self._paths = sorted([*paths, *(unlisted or {})]) if unlisted else paths
        self.unlisted = {printable_path(path): reason for path, reason in (unlisted or {}).items()}

    def items(self) -> list[Item]:
        return [
            Item(i, printable_path(Path(os.path.relpath(path, self.root)).as_posix()), printable_path(path))
            for i, path in enumerate(self._paths)
        ]

    def read(self, item: Item) -> bytes:
        if item.source in self.unlisted:
            raise ImageDecodeError(self.unlisted[item.source])
        return read_image_bytes(os_path_of(item.source))


def reader_only(source: Source) -> Source:
    """What a worker needs of a source: ``read(item)``. A file source's ``read`` uses only the item's path, so its
    list of every input (hundreds of MB for millions of images) stays in the driver process."""
    if isinstance(source, FileSource):
        return FileSource([], source.root, source.description)
    return source


def directory_source(root: str | os.PathLike) -> FileSource:
    """Every image under ``root`` (jpg, png, bmp, webp, tif; recursive, sorted; broken symlinks included so they
    are reported)."""
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        raise SourceError(f"input not found: {root}")
    if not root.is_dir():  # one file (a FIFO or device too: reading it gives the error row)
        return FileSource([root], root.parent, str(root))
    scan = scan_images(root)
    if not scan.images and not scan.unlisted:
        raise SourceError(f"no images (jpg, jpeg, png, bmp, webp, tif) under {root}")
    return FileSource(scan.images, root, str(root), scan.unlisted)


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
    try:
        listing = read_file_bounded(list_file, MAX_LIST_BYTES)
    except FileReadError as exc:
        raise SourceError(f"cannot read file list {list_file}: {exc}") from None
    for raw_line in listing.splitlines():
        line = os.fsdecode(raw_line).strip()  # paths are bytes to the OS: non-UTF-8 names stay readable
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
        except (FileNotFoundError, RecordIOError) as exc:
            raise SourceError(str(exc)) from None
        self.description = str(rec_path)
        self.names = self.label_names(Path(rec_path).with_name("labels.tsv"))

    @staticmethod
    def label_names(path: Path) -> dict[int, str]:
        """``label -> identity`` from a ``labels.tsv`` (``<label><TAB><identity>`` lines); empty when there is none."""
        if not os.path.lexists(path):
            return {}
        try:
            text = read_text_bounded(path, MAX_LIST_BYTES)
        except FileReadError as exc:
            raise SourceError(f"{path}: {exc}") from None
        names: dict[int, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            label, sep, identity = line.partition("\t")
            if not sep or not label.strip().lstrip("-").isdigit():
                raise SourceError(f"{path}:{number}: expected '<label><TAB><identity>', got {line!r}")
            names[int(label)] = identity
        return names

    def items(self) -> list[Item]:
        """One item per image record. A record whose header cannot be read (a NaN label, damaged bytes) is still
        an item, so the run records an ``error`` row for it (``read`` raises the reason); it is filed under the
        label of the record before it (after it, for the first), which keeps labels the source's own and
        identities contiguous, as a RecordIO output needs."""
        try:
            keys = self.reader.image_keys()
        except RecordIOError as exc:
            raise SourceError(f"{self.reader.rec_path}: header record: {exc}") from None
        labels: list[int | None] = []
        for key in keys:
            try:
                labels.append(int(self.reader.read_image_record(key)[0].label[0]))
            except RecordIOError:
                labels.append(None)
        known = [label for label in labels if label is not None]
        previous = known[0] if known else 0
        items = []
        for index, (key, label) in enumerate(zip(keys, labels)):
            label = previous if label is None else label
            previous = label
            identity = self.names.get(label, str(label))
            name = f"{identity}/{key}.jpg" if identity else f"{key}.jpg"
            items.append(Item(index, name, f"{self.reader.rec_path}#{key}", label))
        return items

    def read(self, item: Item) -> bytes:
        key = int(item.source.rsplit("#", 1)[1])
        try:
            return self.reader.read_image_record(key)[1]
        except RecordIOError as exc:
            raise ImageDecodeError(f"record {key}: {exc}") from None


def open_source(input_path: str | os.PathLike, root: str | os.PathLike | None = None) -> Source:
    """Pick the source from the input: a ``.rec`` file, a ``.txt``/``.lst`` file list, or a directory / image."""
    path = Path(input_path)
    if path.suffix == ".rec":
        return RecordIOSource(path)
    if path.suffix in (".txt", ".lst") and path.is_file():
        return file_list_source(path, root)
    return directory_source(path)
