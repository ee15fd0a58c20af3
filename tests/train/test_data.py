import json

import numpy as np
import pytest
import torch

from facepipe.io.images import ImageDecodeError
from facepipe.train.augment import EvalTransform, FaceTargets, TrainAugment
from facepipe.train.data import (
    AnnotationError,
    FaceDetectionDataset,
    TrainSample,
    collate,
    read_annotations,
    read_jsonl,
    read_label_txt,
    write_jsonl,
)
from tests.conftest import shared_path

LABEL_TXT = """# 0--Parade/0_Parade_marchingband_1_849.jpg
449 330 122 149 488.906 373.643 0.0 542.089 376.442 0.0 515.031 412.83 0.0 485.174 425.893 0.0 538.357 431.491 0.0 0.82
# 0--Parade/0_Parade_Parade_0_904.jpg
361 98 263 339 424.143 251.656 0.0 547.134 232.571 0.0 494.121 325.875 0.0 453.83 368.286 0.0 561.978 342.839 0.0 0.89
78 221 7 8 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0
10 10 0 5 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0 -1.0
# 1--Handshaking/empty.jpg
# 2--Demonstration/val_style.jpg
5 6 20 30
"""


def test_label_txt_boxes_landmarks_and_missing_landmarks(tmp_path):
    path = tmp_path / "label.txt"
    path.write_text(LABEL_TXT)
    samples = read_label_txt(path, tmp_path / "images")
    assert [s.image_path.relative_to(tmp_path / "images").as_posix() for s in samples] == [
        "0--Parade/0_Parade_marchingband_1_849.jpg", "0--Parade/0_Parade_Parade_0_904.jpg",
        "1--Handshaking/empty.jpg", "2--Demonstration/val_style.jpg",
    ]
    first = samples[0].faces
    np.testing.assert_allclose(first.boxes, [[449, 330, 571, 479]])
    np.testing.assert_allclose(first.landmarks[0, 0], [488.906, 373.643], rtol=1e-6)
    np.testing.assert_allclose(first.landmarks[0, 4], [538.357, 431.491], rtol=1e-6)
    second = samples[1].faces
    assert len(second) == 2  # the zero-width face is dropped
    assert second.has_landmarks.tolist() == [True, False]
    rows = second.to_rows(1000.0, 500.0)
    assert rows[:, 14].tolist() == [1.0, -1.0]  # reference labels: +1 with landmarks, -1 without
    np.testing.assert_allclose(rows[1, :4], [0.078, 0.442, 0.085, 0.458], rtol=1e-5)
    assert len(samples[2].faces) == 0
    assert samples[3].faces.has_landmarks.tolist() == [False]


@pytest.mark.parametrize(
    "text, message",
    [("12 13 14 15\n", "before the first"), ("# a.jpg\n1 2 x 4\n", "not a list of numbers"), ("# a.jpg\n1 2 3\n", "expected")],
)
def test_label_txt_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "label.txt"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_label_txt(path, tmp_path)


def test_jsonl_round_trip_and_errors(tmp_path):
    faces = FaceTargets(
        [[1, 2, 30, 40], [50, 60, 90, 100]],
        np.arange(20, dtype=np.float32).reshape(2, 5, 2),
        [True, False],
    )
    samples = [TrainSample(tmp_path / "a" / "b.jpg", faces), TrainSample(tmp_path / "c.png", FaceTargets(np.zeros((0, 4)), np.zeros((0, 5, 2)), []))]
    path = tmp_path / "train.jsonl"
    write_jsonl(samples, path, tmp_path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["path"] == "a/b.jpg" and first["faces"][1]["landmarks"] is None
    back = read_jsonl(path, tmp_path)
    assert [s.image_path for s in back] == [s.image_path for s in samples]
    np.testing.assert_allclose(back[0].faces.boxes, faces.boxes)
    np.testing.assert_allclose(back[0].faces.landmarks[0], faces.landmarks[0])
    assert back[0].faces.has_landmarks.tolist() == [True, False]
    assert len(back[1].faces) == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "x.jpg", "faces": [{"box": [1, 2, 3]}]}\n')
    with pytest.raises(AnnotationError, match=r"bad.jsonl:1: box needs 4 values"):
        read_jsonl(bad, tmp_path)
    bad.write_text('{"path": "x.jpg", "faces": [{"box": [1, 2, 3, 4], "landmarks": [[1, 2]]}]}\n')
    with pytest.raises(AnnotationError, match="5 \\(x, y\\) points"):
        read_jsonl(bad, tmp_path)
    with pytest.raises(FileNotFoundError):
        read_annotations("jsonl", tmp_path / "missing.jsonl", tmp_path)
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotations("coco", path, tmp_path)


def test_wider_mat_restricted_to_present_images():
    mat = shared_path("widerface", "wider_face_val.mat")
    root = shared_path("widerface", "val_images")
    samples = read_annotations("wider-mat", mat, root)
    assert len(samples) == 323  # the shared subset, out of 3226 val images in the .mat
    assert all(s.image_path.is_file() for s in samples)
    first = next(s for s in samples if s.image_path.name == "0_Parade_marchingband_1_379.jpg")
    assert len(first.faces) > 0 and not first.faces.has_landmarks.any()
    assert ((first.faces.boxes[:, 2:] - first.faces.boxes[:, :2]) > 0).all()


def test_dataset_is_seeded_per_epoch_and_index_and_collates():
    root = shared_path("widerface", "val_images")
    samples = read_annotations("wider-mat", shared_path("widerface", "wider_face_val.mat"), root)[:2]
    dataset = FaceDetectionDataset(samples, TrainAugment(image_size=96), seed=3)
    a0 = dataset[0]
    assert torch.equal(a0[0], dataset[0][0]) and torch.equal(a0[1], dataset[0][1])
    dataset.set_epoch(1)
    assert not torch.equal(a0[0], dataset[0][0])
    images, targets = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 96, 96) and len(targets) == 2 and targets[0].shape[1] == 15
    plain = FaceDetectionDataset(samples, EvalTransform(image_size=96))
    image, rows = plain[0]
    assert len(rows) == len(samples[0].faces)


def test_dataset_reports_unreadable_image(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dataset = FaceDetectionDataset([TrainSample(broken, FaceTargets(np.zeros((0, 4)), np.zeros((0, 5, 2)), []))], EvalTransform(64))
    with pytest.raises(ImageDecodeError, match="broken.jpg: not a decodable image"):
        dataset[0]
