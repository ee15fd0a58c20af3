import cv2
import numpy as np
import pandas as pd
import pytest

from facepipe.io.images import ImageDecodeError
from facepipe.io.recordio import InsightfaceDatasetWriter, RecordHeader, RecordIOError, RecordIOReader, RecordIOWriter
from facepipe.pipeline.sources import SourceError, open_source
from tests.conftest import shared_path

PNG = cv2.imencode(".png", np.full((4, 4, 3), 9, np.uint8))[1].tobytes()


def _dataset(path, labels):
    with RecordIOWriter(path) as writer:
        for key, label in enumerate(labels, start=1):
            writer.write_image(key, RecordHeader((label,), key, 0), PNG)
    return path


@pytest.mark.parametrize("label", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_labels_become_error_rows_and_reading_goes_on(tmp_path, label):
    source = open_source(_dataset(tmp_path / "train.rec", [3.0, label, 4.0]))
    items = source.items()
    assert [(i.key, i.label) for i in items] == [("3/1.jpg", 3), ("3/2.jpg", 3), ("4/3.jpg", 4)]
    assert source.read(items[0]) == PNG and source.read(items[2]) == PNG
    with pytest.raises(ImageDecodeError, match="record 2: record label .* is not a finite number"):
        source.read(items[1])
    with pytest.raises(RecordIOError, match="not a finite number"):
        RecordIOReader(tmp_path / "train.rec").read_image_record(2)


def test_align_records_the_bad_record_and_keeps_the_source_labels(tmp_path):
    from facepipe.pipeline.align import AlignConfig, run_align

    rec = tmp_path / "train.rec"
    jpeg = shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", "01.jpg").read_bytes()
    with RecordIOWriter(rec) as writer:
        for key, label in enumerate([7.0, float("nan"), 9.0], start=1):
            writer.write_image(key, RecordHeader((label,), key, 0), jpeg)
    run_align(AlignConfig(), open_source(rec), tmp_path / "out", sink_kind="recordio", workers=0, progress=False)
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet").sort_values("index")
    assert manifest["status"].tolist() == ["ok", "error", "ok"], manifest[["status", "reason"]]
    assert "not a finite number" in manifest["reason"].iloc[1]
    labels = [int(RecordIOReader(tmp_path / "out" / "train.rec").read_image_record(k)[0].label[0]) for k in (1, 2)]
    assert labels == [7, 9]


def test_non_finite_header_record_is_one_error(tmp_path):
    rec = tmp_path / "train.rec"
    with RecordIOWriter(rec) as writer:
        writer.write_image(0, RecordHeader((float("nan"), 5.0), 0, 0), b"")
        writer.write_image(1, RecordHeader((1.0,), 1, 0), PNG)
    with pytest.raises(SourceError, match="header record: record label .* not a finite number"):
        open_source(rec).items()


@pytest.mark.parametrize(
    "line, reason",
    [("1\t-8", "expected 'key<TAB>offset'"), ("1\t99999999", "past the end"), ("x\t0", "expected"), ("1\t0\t4", "expected")],
)
def test_bad_index_offsets_are_refused_naming_the_line(tmp_path, line, reason):
    with InsightfaceDatasetWriter(tmp_path / "train.rec") as writer:
        writer.add(3, PNG)
    idx = tmp_path / "train.idx"
    idx.write_text(idx.read_text() + line + "\n")
    with pytest.raises(RecordIOError, match=reason) as info:
        RecordIOReader(tmp_path / "train.rec")
    assert "train.idx:" in str(info.value)
    with pytest.raises(SourceError, match=reason):
        open_source(tmp_path / "train.rec")


def test_non_ascii_index_is_refused(tmp_path):
    _dataset(tmp_path / "train.rec", [1.0])
    (tmp_path / "train.idx").write_bytes(b"1\t0\xff\n")
    with pytest.raises(RecordIOError, match="not an ASCII index"):
        RecordIOReader(tmp_path / "train.rec")
