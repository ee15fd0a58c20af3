import pickle
import struct

import cv2
import numpy as np
import pytest

from facepipe.io.recordio import (
    RECORDIO_MAGIC,
    InsightfaceDatasetWriter,
    RecordHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    encode_record_frames,
    iter_records,
    pack_record,
    unpack_record,
)

MAGIC = struct.pack("<I", RECORDIO_MAGIC)


def test_whole_record_layout_is_magic_length_payload_padding():
    frames = encode_record_frames(b"abcde")
    assert frames[:4] == MAGIC
    assert struct.unpack("<I", frames[4:8])[0] == 5  # flag 0, length 5
    assert frames[8:13] == b"abcde" and frames[13:] == b"\x00\x00\x00"


def test_payload_containing_the_magic_is_split_and_rejoined(tmp_path):
    payload = b"HEAD" + MAGIC + b"middle!!" + MAGIC + b"tail"  # magic at 4-byte aligned offsets 4 and 16
    frames = encode_record_frames(payload)
    flags = []
    pos = 0
    while pos < len(frames):
        assert frames[pos : pos + 4] == MAGIC
        lrecord = struct.unpack("<I", frames[pos + 4 : pos + 8])[0]
        flags.append(lrecord >> 29)
        length = lrecord & ((1 << 29) - 1)
        pos += 8 + length + (-length % 4)
    assert flags == [1, 2, 3]
    with RecordIOWriter(tmp_path / "a.rec") as writer:
        writer.write(0, b"before")
        writer.write(1, payload)
        writer.write(2, MAGIC)  # a payload that is only the magic: two empty parts
        writer.write(3, b"after")
    reader = RecordIOReader(tmp_path / "a.rec")
    assert [reader.read(k) for k in range(4)] == [b"before", payload, MAGIC, b"after"]
    assert list(iter_records(tmp_path / "a.rec")) == [b"before", payload, MAGIC, b"after"]


def test_unaligned_magic_is_not_split():
    payload = b"x" + MAGIC + b"yyy"
    frames = encode_record_frames(payload)
    assert struct.unpack("<I", frames[4:8])[0] >> 29 == 0


def test_header_round_trip_single_and_multiple_labels():
    header, data = unpack_record(pack_record(RecordHeader((7.0,), 3, 4), b"img"))
    assert header == RecordHeader((7.0,), 3, 4) and data == b"img"
    header, data = unpack_record(pack_record(RecordHeader((1.0, 2.5, 3.0)), b"xyz"))
    assert header.label == (1.0, 2.5, 3.0) and data == b"xyz"
    raw = pack_record(RecordHeader((5.0,)), b"")
    assert len(raw) == 24 and struct.unpack("<IfQQ", raw) == (0, 5.0, 0, 0)


def test_insightface_layout_round_trip_with_images(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for label in (0, 0, 0, 1, 2, 2):
        image = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
        images.append((label, cv2.imencode(".png", image)[1].tobytes(), image))
    # force a magic occurrence inside an encoded image payload (after the 24-byte header)
    forced = b"\x89PNG" + MAGIC * 3
    with InsightfaceDatasetWriter(tmp_path / "train.rec") as writer:
        for label, data, _ in images:
            writer.add(label, data)
        writer.add(3, forced)
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    header0, _ = reader.read_image_record(0)
    assert header0.label == (8.0, 12.0)
    assert reader.image_keys() == list(range(1, 8))
    for key, (label, _, image) in enumerate(images, start=1):
        header, data = reader.read_image_record(key)
        assert header.label == (float(label),)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert np.array_equal(decoded, image)
    assert reader.read_image_record(7)[1] == forced
    ranges = [reader.read_image_record(k)[0].label for k in range(8, 12)]
    assert ranges == [(1.0, 4.0), (4.0, 5.0), (5.0, 7.0), (7.0, 8.0)]
    # the reader pickles (to worker processes) without its open file
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(7) == reader.read(7)


def test_index_lines_are_key_tab_offset_sorted(tmp_path):
    with RecordIOWriter(tmp_path / "x.rec") as writer:
        writer.write(5, b"five")
        writer.write(0, b"zero")
    lines = (tmp_path / "x.idx").read_text().splitlines()
    assert lines == ["0\t12", "5\t0"]  # 8-byte frame head + 4-byte payload


def test_noncontiguous_labels_are_refused(tmp_path):
    writer = InsightfaceDatasetWriter(tmp_path / "t.rec")
    writer.add(0, b"a")
    writer.add(1, b"b")
    with pytest.raises(ValueError, match="contiguous"):
        writer.add(0, b"c")
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with RecordIOWriter(tmp_path / "y.rec") as writer:
            writer.write(0, b"data")
            raise RuntimeError("interrupted")
    assert not list(tmp_path.iterdir())


def test_corrupt_files_raise_clear_errors(tmp_path):
    (tmp_path / "bad.rec").write_bytes(b"\x00" * 16)
    (tmp_path / "bad.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match="bad magic"):
        RecordIOReader(tmp_path / "bad.rec").read(0)
    frames = encode_record_frames(b"0123456789")
    (tmp_path / "trunc.rec").write_bytes(frames[:12])
    (tmp_path / "trunc.idx").write_text("0\t0\n")
    with pytest.raises(RecordIOError, match="truncated"):
        RecordIOReader(tmp_path / "trunc.rec").read(0)
    first_part_only = MAGIC + struct.pack("<I", (1 << 29) | 4) + b"abcd"
    (tmp_path / "split.rec").write_bytes(first_part_only)
    with pytest.raises(RecordIOError, match="inside a split record"):
        list(iter_records(tmp_path / "split.rec"))
    (tmp_path / "noidx.rec").write_bytes(frames)
    with pytest.raises(FileNotFoundError, match="index"):
        RecordIOReader(tmp_path / "noidx.rec")
