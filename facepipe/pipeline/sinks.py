"""Where aligned crops go: a directory tree mirroring the input, RecordIO, or tar shards.

Every sink works chunk by chunk: ``write_chunk(chunk_id, crops)`` must leave either the chunk's complete
output or nothing final (temp files live in the run's staging folder or end in ``.tmp`` and are moved with
``os.replace``). ``finish`` runs once every chunk is committed. Outputs are named by ``output_names`` so the
manifest, the sinks and any other engine agree.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Protocol, Sequence

from facepipe.io.recordio import InsightfaceDatasetWriter, RecordHeader, RecordIOReader, RecordIOWriter
from facepipe.pipeline.sources import Item

SINK_KINDS = ("dir", "recordio", "tar")


def colliding_stems(items: Sequence[Item]) -> set[str]:
    """Keys whose extension-less names clash (``a.png`` and ``a.jpg``): they keep their extension in outputs."""
    stems = Counter(str(PurePosixPath(item.key).with_suffix("")) for item in items)
    return {item.key for item in items if stems[str(PurePosixPath(item.key).with_suffix(""))] > 1}


def output_names(item: Item, n_crops: int, keep_all: bool, extension: str, keep_suffix: bool = False) -> list[str]:
    """Relative output names: ``identity/name.jpg``, or ``name_0.jpg``, ``name_1.jpg`` ... with ``--keep all``."""
    path = PurePosixPath(item.key)
    stem = str(path) if keep_suffix else str(path.with_suffix(""))
    if keep_all:
        return [f"{stem}_{i}.{extension}" for i in range(n_crops)]
    return [f"{stem}.{extension}"] if n_crops else []


# What a sink receives per chunk: (item, output name, encoded crop), in item order.
CropEntry = tuple[Item, str, bytes]


class Sink(Protocol):
    kind: str

    def done(self) -> bool: ...

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None: ...

    def finish(self, labels: dict[str, int]) -> None: ...


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class DirectorySink:
    """Crops as files under ``root``, mirroring the input's folders (identity folders kept)."""

    kind = "dir"

    def __init__(self, root: str | os.PathLike, staging_dir: str | os.PathLike) -> None:
        self.root = Path(root)
        self.staging_dir = Path(staging_dir)

    def done(self) -> bool:
        return False

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None:
        for n, (_, name, data) in enumerate(crops):
            target = self.root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.staging_dir / f"{chunk_id}-{n}.tmp"
            _fsync_write(tmp, data)
            os.replace(tmp, target)

    def finish(self, labels: dict[str, int]) -> None:
        pass


class TarShardSink:
    """One tar per chunk (``shards/chunk-NNNNNN.tar``, WebDataset-style members named like the mirror tree);
    members have fixed metadata so two runs give identical bytes."""

    kind = "tar"

    def __init__(self, root: str | os.PathLike) -> None:
        self.shard_dir = Path(root) / "shards"

    def done(self) -> bool:
        return False

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None:
        if not crops:
            return
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        target = self.shard_dir / f"chunk-{chunk_id:06d}.tar"
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for _, name, data in crops:
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def finish(self, labels: dict[str, int]) -> None:
        for stale in self.shard_dir.glob("*.tmp"):
            stale.unlink()


class RecordIOSink:
    """insightface ``train.rec`` / ``train.idx`` / ``labels.tsv`` under ``root``.

    Chunks go to ``shards/chunk-NNNNNN.rec`` (records carry their label and item index); ``finish`` merges
    them, in chunk order, into one insightface-layout file (header record 0, identity ranges) and removes the
    shards. Identity labels: the source's label (RecordIO input) or the folder's rank of first appearance
    in the input (``labels.tsv`` maps labels to folders).
    """

    kind = "recordio"

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.rec_path = self.root / "train.rec"

    def done(self) -> bool:
        return self.rec_path.exists() and not self.shard_dir.exists()

    def write_chunk(self, chunk_id: int, crops: Sequence[CropEntry]) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        with RecordIOWriter(self.shard_dir / f"chunk-{chunk_id:06d}.rec") as writer:
            for key, (item, _, data) in enumerate(crops):
                writer.write_image(key, RecordHeader((float(item.label),), item.index, 0), data)

    def finish(self, labels: dict[str, int]) -> None:
        if not self.shard_dir.exists():
            return
        with InsightfaceDatasetWriter(self.rec_path) as writer:
            for shard in sorted(self.shard_dir.glob("chunk-*.rec")):
                with RecordIOReader(shard) as reader:
                    for key in reader.keys():
                        header, data = reader.read_image_record(key)
                        writer.add(int(header.label[0]), data)
        tmp = self.root / "labels.tsv.tmp"
        tmp.write_text("".join(f"{label}\t{identity}\n" for identity, label in sorted(labels.items(), key=lambda x: x[1])))
        os.replace(tmp, self.root / "labels.tsv")
        shutil.rmtree(self.shard_dir)


def identity_labels(items: Sequence[Item]) -> dict[str, int]:
    """Identity folder -> label: the source's labels when it has them, else folders numbered in the order they
    first appear among the (sorted) items, so labels ascend through the output."""
    if items and all(item.label >= 0 for item in items):
        return {item.identity: item.label for item in items}
    labels: dict[str, int] = {}
    for item in items:
        labels.setdefault(item.identity, len(labels))
    return labels


def create_sink(kind: str, root: str | os.PathLike, staging_dir: str | os.PathLike) -> Sink:
    if kind == "dir":
        return DirectorySink(root, staging_dir)
    if kind == "tar":
        return TarShardSink(root)
    if kind == "recordio":
        return RecordIOSink(root)
    raise ValueError(f"unknown sink {kind!r}; choose from {', '.join(SINK_KINDS)}")
