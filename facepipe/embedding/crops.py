"""Where ``facepipe embed`` reads aligned crops from: every layout ``facepipe align`` writes.

``open_crops(path)`` picks the source from what is there:

- a ``.rec`` file, or a folder holding ``train.rec`` (``align --sink recordio``): the records, named
  ``<identity>/<record key>.jpg`` with the identity names of the ``labels.tsv`` beside it;
- a folder holding ``shards/chunk-*.tar`` (``align --sink tar``): the tar members, named as in the mirror tree;
- any other folder (``align --sink dir``, or crops from elsewhere): its image files, named by relative path,
  skipping facepipe's state folders.

Every source is a ``facepipe.pipeline.sources.Source``: picklable ``Item``s whose ``key`` is the crop's name in the
embedding manifest (``path``) and whose identity is ``identity_of(key)``; ``read(item)`` returns the encoded crop.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from facepipe.io.images import is_image_path, list_images
from facepipe.pipeline.sources import FileSource, Item, RecordIOSource, Source, SourceError

STATE_DIRS = frozenset({".facepipe", "shards"})  # align's run state; an embedding folder's shards
RECORDIO_NAME = "train.rec"
TAR_PATTERN = "chunk-*.tar"


class CropFolderError(SourceError):
    """The crops' folder is missing, empty, or unreadable."""


class TarShardSource:
    """The members of ``align --sink tar``'s ``shards/chunk-NNNNNN.tar``: each item locates its bytes by offset, so
    reading needs no tar parsing (and no open file: the source pickles to any worker)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.description = str(self.root)
        self.shards = sorted((self.root / "shards").glob(TAR_PATTERN))

    def items(self) -> list[Item]:
        items: list[Item] = []
        for shard in self.shards:
            try:
                with tarfile.open(shard, mode="r:") as tar:
                    members = [m for m in tar.getmembers() if m.isfile() and is_image_path(m.name)]
            except (OSError, tarfile.TarError) as exc:
                raise CropFolderError(f"{shard}: unreadable tar shard ({exc})") from None
            for member in members:
                items.append(Item(len(items), member.name, f"{shard}#{member.offset_data}+{member.size}"))
        return items

    def read(self, item: Item) -> bytes:
        path, span = item.source.rsplit("#", 1)
        offset, size = (int(v) for v in span.split("+"))
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path} is truncated: member {item.key} ends past the end of the file")
        return data


def crop_folder_source(root: str | os.PathLike) -> FileSource:
    """The image files under ``root`` (sorted), named by relative POSIX path, state folders skipped."""
    root = Path(root)
    paths = [p for p in list_images(root) if p.relative_to(root).parts[0] not in STATE_DIRS]
    return FileSource(paths, root, str(root))


def open_crops(path: str | os.PathLike) -> Source:
    """The crops at ``path`` in whichever layout align wrote them (see the module docstring)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".rec":
        return RecordIOSource(path)
    if not path.is_dir():
        raise CropFolderError(f"aligned folder not found: {path}")
    if (path / RECORDIO_NAME).is_file():
        return RecordIOSource(path / RECORDIO_NAME)
    if any((path / "shards").glob(TAR_PATTERN)):
        return TarShardSource(path)
    return crop_folder_source(path)


def list_crops(aligned_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the crops under a folder, sorted, skipping facepipe's state folders."""
    root = Path(aligned_dir)
    if not root.is_dir():
        raise CropFolderError(f"aligned folder not found: {root}")
    return sorted(item.key for item in crop_folder_source(root).items())


