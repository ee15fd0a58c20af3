"""MXNet RecordIO (``train.rec`` + ``train.idx``) read and written without mxnet.

How insightface ships MS1M / Glint360K / WebFace. The format (REFERENCE.md, "Data formats"):

* every record is ``magic (uint32 LE 0xced7230a)``, ``lrecord (uint32 LE)``, payload, zero padding to 4 bytes.
  ``lrecord``'s upper 3 bits are a continuation flag (0 whole, 1 first, 2 middle, 3 last part) and its lower 29
  bits the part length. mxnet splits a record wherever the magic value occurs 4-byte aligned inside its payload,
  dropping those 4 bytes; the reader puts the magic back between parts.
* an image payload starts with the ``IfQQ`` header (flag, label, id, id2; 24 bytes); when ``flag > 0`` the label
  is ``flag`` float32 values following the header, otherwise it is the header's float.
* ``train.idx`` is text, ``key\\toffset`` per line.
* insightface training sets: record 0 is a header whose label ``[a, b]`` says images are keys ``1..a-1`` and
  identity records are keys ``a..b-1``, each labelled ``[first image key, end image key)``.
"""

from __future__ import annotations

import math
import os
import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from facepipe.io.files import GiB, FileReadError, read_file_bounded
from facepipe.io.atomic import publish, temporary_path

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_HEADER = struct.Struct("<IfQQ")


MAX_INDEX_BYTES = 4 * GiB
_DECIMAL = re.compile(r"[0-9]+")


class RecordIOError(ValueError):
    """The file is not valid RecordIO (bad magic, truncated record, bad index)."""


@dataclass(frozen=True)
class RecordHeader:
    """The ``IfQQ`` image-record header; ``label`` holds one value or ``flag`` values."""

    label: tuple[float, ...]
    id: int = 0
    id2: int = 0


def pack_record(header: RecordHeader, payload: bytes) -> bytes:
    """Image record payload: header (+ extra float32 labels) then the encoded image."""
    labels = tuple(float(v) for v in header.label)
    if len(labels) == 1:
        return _HEADER.pack(0, labels[0], header.id, header.id2) + payload
    return _HEADER.pack(len(labels), 0.0, header.id, header.id2) + np.asarray(labels, "<f4").tobytes() + payload


def unpack_record(record: bytes) -> tuple[RecordHeader, bytes]:
    if len(record) < _HEADER.size:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_HEADER.size}-byte IfQQ header")
    flag, label, id1, id2 = _HEADER.unpack_from(record)
    offset = _HEADER.size
    if flag > 0:
        end = offset + 4 * flag
        if end > len(record):
            raise RecordIOError(f"record declares {flag} labels but is only {len(record)} bytes")
        labels = tuple(float(v) for v in np.frombuffer(record, "<f4", count=flag, offset=offset))
        offset = end
    else:
        labels = (float(label),)
    if not all(math.isfinite(v) for v in labels):
        raise RecordIOError(f"record label {labels[0] if len(labels) == 1 else labels} is not a finite number")
    return RecordHeader(labels, id1, id2), record[offset:]


def _split_payload(payload: bytes) -> list[bytes]:
    """Parts of a payload split at each 4-byte-aligned magic occurrence (the magic itself removed), as mxnet does."""
    parts, start = [], 0
    view = memoryview(payload)
    for pos in range(0, len(payload) - 3, 4):
        if view[pos : pos + 4] == _MAGIC_BYTES:
            parts.append(bytes(view[start:pos]))
            start = pos + 4
    parts.append(bytes(view[start:]))
    return parts


def encode_record_frames(payload: bytes) -> bytes:
    """The on-disk bytes of one record (one or several frames)."""
    parts = _split_payload(payload) if _MAGIC_BYTES in payload else [payload]
    out = bytearray()
    for i, part in enumerate(parts):
        if len(part) > _LENGTH_MASK:
            raise RecordIOError(f"record part of {len(part)} bytes exceeds the 29-bit RecordIO length")
        if len(parts) == 1:
            flag = 0
        else:
            flag = 1 if i == 0 else (3 if i == len(parts) - 1 else 2)
        out += _MAGIC_BYTES + struct.pack("<I", (flag << 29) | len(part)) + part
        out += b"\x00" * (-len(part) % 4)
    return bytes(out)


def read_record_at(stream: BinaryIO, offset: int | None = None) -> bytes | None:
    """Read one logical record (re-joining split parts) at ``offset`` (or the current position); None at EOF."""
    if offset is not None:
        stream.seek(offset)
    chunks: list[bytes] = []
    while True:
        head = stream.read(8)
        if not head:
            if chunks:
                raise RecordIOError("file ends inside a split record")
            return None
        if len(head) < 8:
            raise RecordIOError("truncated record header")
        magic, lrecord = struct.unpack("<II", head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"bad magic 0x{magic:08x} at offset {stream.tell() - 8}")
        flag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        data = stream.read(length)
        if len(data) < length:
            raise RecordIOError("truncated record payload")
        stream.read(-length % 4)
        if flag == 0:
            if chunks:
                raise RecordIOError("whole record found inside a split record")
            return data
        if flag == 1:
            if chunks:
                raise RecordIOError("split record restarted before it ended")
            chunks.append(data)
        elif flag in (2, 3):
            if not chunks:
                raise RecordIOError(f"continuation part (flag {flag}) without a first part")
            chunks.append(_MAGIC_BYTES)
            chunks.append(data)
            if flag == 3:
                return b"".join(chunks)
        else:
            raise RecordIOError(f"invalid continuation flag {flag}")


def read_index(idx_path: str | os.PathLike, rec_size: int | None = None) -> dict[int, int]:
    """``key -> byte offset`` from a ``.idx`` file; with ``rec_size``, offsets outside the ``.rec`` are refused
    (naming the line), so a damaged index fails when opened rather than as a seek error mid-run."""
    index: dict[int, int] = {}
    try:
        text = read_file_bounded(idx_path, MAX_INDEX_BYTES).decode("ascii")
    except FileReadError as exc:
        raise RecordIOError(f"{idx_path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecordIOError(f"{idx_path}: not an ASCII index (byte at offset {exc.start})") from None
    for line_no, line in enumerate(io.StringIO(text), 1):  # lazily: no list of every line of a large index
        line = line.strip()
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not all(_DECIMAL.fullmatch(f) for f in fields):
            raise RecordIOError(f"{idx_path}:{line_no}: expected 'key<TAB>offset' (non-negative integers), got {line!r}")
        key, offset = int(fields[0]), int(fields[1])
        if rec_size is not None and offset >= rec_size:
            raise RecordIOError(f"{idx_path}:{line_no}: offset {offset} is past the end of the .rec ({rec_size} bytes)")
        index[key] = offset
    return index


class RecordIOReader:
    """Random access to an indexed ``.rec``. Opens the file lazily so instances can be pickled to workers."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        if not self.idx_path.is_file():
            raise FileNotFoundError(f"RecordIO index not found: {self.idx_path} (the .idx next to the .rec)")
        self.index = read_index(self.idx_path, self.rec_path.stat().st_size)
        self._stream: BinaryIO | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stream"] = None
        return state

    def keys(self) -> list[int]:
        return sorted(self.index)

    def read(self, key: int) -> bytes:
        if key not in self.index:
            raise KeyError(f"key {key} not in {self.idx_path}")
        if self._stream is None:
            self._stream = open(self.rec_path, "rb")
        record = read_record_at(self._stream, self.index[key])
        if record is None:
            raise RecordIOError(f"key {key}: offset {self.index[key]} is past the end of {self.rec_path}")
        return record

    def read_image_record(self, key: int) -> tuple[RecordHeader, bytes]:
        return unpack_record(self.read(key))

    def image_keys(self) -> list[int]:
        """Keys of image records: ``1..a-1`` from an insightface header record 0, otherwise every key."""
        keys = self.keys()
        if 0 in self.index:
            header, _ = self.read_image_record(0)
            if header.label and header.label[0] > 0 and len(header.label) >= 2:
                end = int(header.label[0])
                return [k for k in keys if 1 <= k < end]
        return keys

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> "RecordIOReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(rec_path: str | os.PathLike) -> Iterator[bytes]:
    """Sequential scan of every record of a ``.rec`` (no index needed)."""
    with open(rec_path, "rb") as stream:
        while (record := read_record_at(stream)) is not None:
            yield record


class RecordIOWriter:
    """Indexed writer. Writes to temporary files beside the targets (``facepipe.io.atomic``: the umask's
    permissions, removed by ``cleanup_temporaries`` after a kill); ``close()`` flushes both and moves them into place.

    The index is written at ``close()`` sorted by key, so records may be appended in any key order (e.g. a
    header record 0 written last, once the counts it holds are known).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self._rec_tmp = temporary_path(self.rec_path)
        self._idx_tmp = temporary_path(self.idx_path)
        self._rec = open(self._rec_tmp, "wb")
        self._offsets: dict[int, int] = {}

    def write(self, key: int, record: bytes) -> None:
        if key in self._offsets:
            raise RecordIOError(f"duplicate key {key}")
        self._offsets[key] = self._rec.tell()
        self._rec.write(encode_record_frames(record))

    def write_image(self, key: int, header: RecordHeader, encoded_image: bytes) -> None:
        self.write(key, pack_record(header, encoded_image))

    def __len__(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        if self._rec.closed:
            return
        self._rec.flush()
        os.fsync(self._rec.fileno())
        self._rec.close()
        with open(self._idx_tmp, "w", encoding="ascii") as idx:
            idx.writelines(f"{key}\t{self._offsets[key]}\n" for key in sorted(self._offsets))
            idx.flush()
            os.fsync(idx.fileno())
        # Both are flushed; a crash between the two renames leaves a new .rec beside the old .idx: a writer that
        # must survive that records completion after (``RecordIOSink.finish`` writes its built marker last).
        publish(self._rec_tmp, self.rec_path)
        publish(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Drop everything written (nothing appears at the final paths)."""
        self._rec.close()
        self._rec_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class InsightfaceDatasetWriter:
    """Streams ``(label, encoded image)`` into insightface layout: images at keys ``1..n``, then one identity
    record per label holding its ``[first key, end key)`` range, and the header record 0 ``[n+1, n+1+ids]``.

    Each label's images must arrive contiguously (insightface's identity ranges are contiguous).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> None:
        self._writer = RecordIOWriter(rec_path, idx_path)
        self._ranges: list[tuple[int, int, int]] = []  # (label, start key, end key)
        self._next_key = 1

    def add(self, label: int, encoded_image: bytes) -> int:
        key = self._next_key
        if self._ranges and self._ranges[-1][0] == label:
            self._ranges[-1] = (label, self._ranges[-1][1], key + 1)
        else:
            if any(existing == label for existing, _, _ in self._ranges):
                raise ValueError(f"label {label} appears again after other labels: identity ranges must be contiguous")
            self._ranges.append((label, key, key + 1))
        self._writer.write_image(key, RecordHeader((float(label),), key, 0), encoded_image)
        self._next_key += 1
        return key

    def close(self) -> None:
        first_identity_key = self._next_key
        for offset, (_, start, end) in enumerate(self._ranges):
            self._writer.write_image(first_identity_key + offset, RecordHeader((float(start), float(end))), b"")
        header = RecordHeader((float(first_identity_key), float(first_identity_key + len(self._ranges))))
        self._writer.write_image(0, header, b"")
        self._writer.close()

    def abort(self) -> None:
        self._writer.abort()

    def __enter__(self) -> "InsightfaceDatasetWriter":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_insightface_dataset(
    rec_path: str | os.PathLike, images: Iterable[tuple[int, bytes]], idx_path: str | os.PathLike | None = None
) -> None:
    """Write ``(label, encoded image)`` pairs (grouped by label) as an insightface ``train.rec``/``train.idx``."""
    with InsightfaceDatasetWriter(rec_path, idx_path) as writer:
        for label, data in images:
            writer.add(label, data)
