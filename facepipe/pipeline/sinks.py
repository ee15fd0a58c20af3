"""Where aligned crops go: a directory tree mirroring the input, RecordIO, or tar shards; and how crops are named.

Every sink keeps one atomicity contract, chunk by chunk:

- ``write_chunk(chunk_id, crops)`` leaves either the chunk's complete outputs or nothing final (every file is
  written under a temporary name and published through ``facepipe.io.atomic``). The job commits the chunk's
  manifest part only after it returns.
- ``remove(chunk_id, names)`` deletes the outputs of inputs that left the data set (a rerun on a shrunk input).
- ``discard(names)`` deletes everything a run with other settings wrote (``--overwrite``).
- ``finish(crops, labels)`` runs after every chunk is committed, with every crop of the current inputs in input
  order. It may run again after a crash at any point of it, and after the input grew: it rebuilds its result
  from the committed chunks.

**Naming rule** (``OutputNames``). A crop is named after its input's key with the extension replaced:
``alice/001.png`` -> ``alice/001.jpg`` (``alice/001_0.jpg``, ``alice/001_1.jpg`` ... with ``--keep all``). When
that name is already taken (compared case-insensitively, so that a copy onto macOS or Windows keeps every crop),
the key keeps its extension (``a.png`` -> ``a.png.jpg``), then gets ``~1``, ``~2`` ... (``a.png~1.jpg``). Taken
means: a crop name of a committed chunk, a name given earlier in this run (inputs in input order), or a folder of
the output tree (``x.png`` beside a folder ``x.jpg/`` becomes ``x.png.jpg``; folders are never renamed). Names of
committed chunks never change, so a data set that grows keeps every existing crop's name; a new input that
collides with an old one gets the suffix, whichever sorts first. An input whose folder would have to replace a
crop file of an earlier run (a folder ``x.jpg/`` added after ``x.png`` became ``x.jpg``) is recorded as an
``error`` row instead of being written.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Protocol, Sequence

from facepipe.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, publish, temporary_path
from facepipe.io.digest import digest_strings
from facepipe.io.recordio import InsightfaceDatasetWriter, RecordHeader, RecordIOReader, RecordIOWriter
from facepipe.pipeline.sources import Item

SINK_KINDS = ("dir", "recordio", "tar")

# What a sink receives per chunk: (item, output name, encoded crop), in item order.
CropEntry = tuple[Item, str, bytes]
# What ``finish`` receives: (chunk id, output name, identity label) of every crop of the current inputs, in order.
CommittedCrop = tuple[int, str, int]


# ---------------------------------------------------------------------------------------------------- names


class OutputNames:
    """Chooses each input's crop *stem* by the naming rule of the module docstring.

    ``folders``: every folder of the output tree (the parents of all current keys); ``committed``: the crop names
    committed chunks hold (they keep them). ``stem(key)`` is then called for the remaining inputs in input order;
    ``names(stem, n)`` gives the crop names.
    """

    def __init__(self, extension: str, keep_all: bool, folders: Iterable[str], committed: Iterable[str]) -> None:
        self.extension = extension
        self.keep_all = keep_all
        self._all_pattern = re.compile(rf"^(.*)_\d+\.{re.escape(extension.casefold())}$")
        self._taken: set[str] = set()
        self._files: set[str] = set()  # committed crop names (a new folder must not replace one)
        for folder in folders:
            self._taken.add(self._claim_of_name(folder.casefold()))
        for name in committed:
            self._files.add(name.casefold())
            self._taken.add(self._claim_of_name(name.casefold()))

    def _claim_of_name(self, name: str) -> str:
        """What a file or folder name blocks: the name itself, or with ``--keep all`` the stem it would come from."""
        if self.keep_all:
            match = self._all_pattern.match(name)
            return f"{match.group(1)}_*" if match else name
        return name

    def _claim_of_stem(self, stem: str) -> str:
        return f"{stem.casefold()}_*" if self.keep_all else f"{stem}.{self.extension}".casefold()

    def names(self, stem: str, n_crops: int) -> list[str]:
        if self.keep_all:
            return [f"{stem}_{i}.{self.extension}" for i in range(n_crops)]
        return [f"{stem}.{self.extension}"] if n_crops else []

    def stem(self, key: str) -> str | None:
        """The stem for ``key`` (claimed), or None when a folder of its path is a committed crop file."""
        parent = PurePosixPath(key).parent
        for folder in (parent, *parent.parents):
            if str(folder) != "." and str(folder).casefold() in self._files:
                return None
        plain = str(PurePosixPath(key).with_suffix("")) if PurePosixPath(key).suffix else key
        candidates = iter(dict.fromkeys([plain, key]))
        n = 0
        while True:
            candidate = next(candidates, None)
            if candidate is None:
                n += 1
                candidate = f"{key}~{n}"
            claim = self._claim_of_stem(candidate)
            if claim not in self._taken:
                self._taken.add(claim)
                return candidate


def output_folders(keys: Iterable[str]) -> set[str]:
    """Every folder the mirrored output tree of ``keys`` has (``a``, ``a/b`` for ``a/b/c.jpg``)."""
    folders: set[str] = set()
    for key in keys:
        parent = PurePosixPath(key).parent
        while str(parent) != "." and str(parent) not in folders:
            folders.add(str(parent))
            parent = parent.parent
    return folders


def identity_labels(items: Sequence[Item]) -> dict[str, int]:
    """Identity folder -> label: the source's labels when it has them, else folders numbered in the order they
    first appear among the (sorted) items, so labels ascend through the output."""
    if items and all(item.label >= 0 for item in items):
        return {item.identity: item.label for item in items}
    labels: dict[str, int] = {}
    for item in items:
        labels.setdefault(item.identity, len(labels))
    return labels


def _inside(root: Path, name: str) -> Path:
    """``root / name`` for a relative name that stays inside ``root`` (names come from manifests: check)."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise ValueError(f"output name {name!r} leaves the output folder")
    return root.joinpath(*parts)


# ---------------------------------------------------------------------------------------------------- sinks


class Sink(Protocol):
    kind: str

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None: ...

    def remove(self, chunk_id: int, names: Sequence[str]) -> None: ...

    def discard(self, names: Sequence[str]) -> None: ...

    def finish(self, crops: Sequence[CommittedCrop], labels: dict[str, int]) -> None: ...


class DirectorySink:
    """Crops as files under ``root``, mirroring the input's folders (identity folders kept). Each crop is written
    in the run's staging folder, flushed, then moved into place."""

    kind = "dir"

    def __init__(self, root: str | os.PathLike, staging_dir: str | os.PathLike) -> None:
        self.root = Path(root)
        self.staging_dir = Path(staging_dir)

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None:
        for n, (_, name, data) in enumerate(crops):
            target = _inside(self.root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(self.staging_dir / f"{chunk_id}-{n}{target.suffix}")
            try:
                tmp.write_bytes(data)
                publish(tmp, target, fsync=True)
            finally:
                tmp.unlink(missing_ok=True)

    def remove(self, chunk_id: int, names: Sequence[str]) -> None:
        self.discard(names)

    def discard(self, names: Sequence[str]) -> None:
        """Delete the crops, then the folders that held only them (a shrunk data set leaves no empty tree)."""
        folders: set[Path] = set()
        for name in names:
            path = _inside(self.root, name)
            path.unlink(missing_ok=True)
            folders.update(p for p in path.parents if p != self.root and self.root in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty (other crops), or already gone

    def finish(self, crops: Sequence[CommittedCrop], labels: dict[str, int]) -> None:
        pass


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, int]:
    """A member with fixed metadata (same crops -> same bytes), and the tar format that can hold its name:
    ustar as before for names of up to 100 (+155 prefix) bytes, PAX beyond."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    try:
        info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        return info, tarfile.USTAR_FORMAT
    except ValueError:  # name too long for ustar
        return info, tarfile.PAX_FORMAT


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    with atomic_path(path, fsync=True) as tmp:
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
            for name, data in members:
                info, tar.format = _tar_member(name, data)
                tar.addfile(info, io.BytesIO(data))


class TarShardSink:
    """One tar per chunk (``shards/chunk-NNNNNN.tar``, WebDataset-style members named like the mirror tree);
    members have fixed metadata so two runs give identical bytes."""

    kind = "tar"

    def __init__(self, root: str | os.PathLike) -> None:
        self.shard_dir = Path(root) / "shards"

    def shard(self, chunk_id: int) -> Path:
        return self.shard_dir / f"chunk-{chunk_id:06d}.tar"

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None:
        if crops:
            write_tar(self.shard(chunk_id), [(name, data) for _, name, data in crops])

    def remove(self, chunk_id: int, names: Sequence[str]) -> None:
        """Rewrite the chunk's shard without ``names`` (or delete it when nothing is left)."""
        path = self.shard(chunk_id)
        if not path.is_file():
            return
        gone = set(names)
        with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tar:
            kept = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.name not in gone]
        if kept:
            write_tar(path, kept)
        else:
            path.unlink()

    def discard(self, names: Sequence[str]) -> None:
        for shard in self.shard_dir.glob("chunk-*.tar"):
            shard.unlink()

    def finish(self, crops: Sequence[CommittedCrop], labels: dict[str, int]) -> None:
        pass


class RecordIOSink:
    """insightface ``train.rec`` / ``train.idx`` / ``labels.tsv`` under ``root``.

    Each chunk's crops go to a shard in the run state (``.facepipe/recordio/chunk-NNNNNN.rec`` + ``.idx``, with the
    crop names in ``.names.json``), kept after the run: ``finish`` builds the three files from the shards, in
    input order (insightface needs each identity's images together, so a grown input is rebuilt, not appended),
    with the identity labels of the current input, and records what it built in ``built.json`` last. A crash at
    any step leaves no ``built.json`` for what the inputs are now, so the next run builds again; when nothing
    changed, a rerun does not rebuild. The shards cost the crops' size once more on disk.
    """

    kind = "recordio"

    def __init__(self, root: str | os.PathLike, state_dir: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shard_dir = Path(state_dir) / "recordio"
        self.rec_path = self.root / "train.rec"
        self.idx_path = self.root / "train.idx"
        self.labels_path = self.root / "labels.tsv"
        self.built_path = self.shard_dir / "built.json"

    def shard(self, chunk_id: int) -> Path:
        return self.shard_dir / f"chunk-{chunk_id:06d}.rec"

    def _names_path(self, chunk_id: int) -> Path:
        return self.shard_dir / f"chunk-{chunk_id:06d}.names.json"

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._names_path(chunk_id), json.dumps([name for _, name, _ in crops]), fsync=True)
        with RecordIOWriter(self.shard(chunk_id)) as writer:
            for key, (item, _, data) in enumerate(crops):
                writer.write_image(key, RecordHeader((float(item.label),), item.index, 0), data)

    def remove(self, chunk_id: int, names: Sequence[str]) -> None:
        pass  # ``finish`` takes only the current inputs' crops from the shards

    def discard(self, names: Sequence[str]) -> None:
        for path in (self.built_path, self.rec_path, self.idx_path, self.labels_path):
            path.unlink(missing_ok=True)
        if self.shard_dir.is_dir():
            for shard in self.shard_dir.glob("chunk-*"):
                shard.unlink()

    def finish(self, crops: Sequence[CommittedCrop], labels: dict[str, int]) -> None:
        label_lines = "".join(f"{label}\t{identity}\n" for identity, label in sorted(labels.items(), key=lambda x: x[1]))
        built = digest_strings([label_lines, *(f"{chunk_id}\t{label}\t{name}" for chunk_id, name, label in crops)])
        outputs = (self.rec_path, self.idx_path, self.labels_path)
        if all(p.is_file() for p in outputs) and self.built_path.is_file() and self.built_path.read_text() == built:
            return
        self.built_path.unlink(missing_ok=True)
        readers: dict[int, tuple[RecordIOReader, dict[str, int]]] = {}
        try:
            with InsightfaceDatasetWriter(self.rec_path) as writer:
                for chunk_id, name, label in crops:
                    if chunk_id not in readers:
                        names = json.loads(self._names_path(chunk_id).read_text())
                        readers[chunk_id] = (RecordIOReader(self.shard(chunk_id)), {n: i for i, n in enumerate(names)})
                    reader, position = readers[chunk_id]
                    writer.add(label, reader.read_image_record(position[name])[1])
        finally:
            for reader, _ in readers.values():
                reader.close()
        atomic_write_bytes(self.labels_path, label_lines.encode("utf-8", "surrogateescape"), fsync=True)
        atomic_write_text(self.built_path, built, fsync=True)


def create_sink(kind: str, root: str | os.PathLike, state_dir: str | os.PathLike) -> Sink:
    """The sink ``kind`` writing under ``root``; ``state_dir`` is the run's ``.facepipe`` folder."""
    if kind == "dir":
        return DirectorySink(root, Path(state_dir) / "staging")
    if kind == "tar":
        return TarShardSink(root)
    if kind == "recordio":
        return RecordIOSink(root, state_dir)
    raise ValueError(f"unknown sink {kind!r}; choose from {', '.join(SINK_KINDS)}")
