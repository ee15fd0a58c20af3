"""MTCNN ``edge_padding``: zero padding of boxes that cross the image edge (the original MTCNN) vs stretch."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.detection import create_detector, pipeline_detector_options
from facepipe.detection.mtcnn import IntegralImage, crop_windows
from facepipe.io.images import read_image
from tests.conftest import shared_path

cv2 = pytest.importorskip("cv2")

# A frontal CFP face that fills its 347x368 frame: facenet-pytorch's stretch puts the landmarks ~39 px
# (mean; up to 99 px) away from RetinaFace's, zero padding 4.4 px (measured 2026-12-01).
FRAME_FILLING = "cfp/cfp-dataset/Data/Images/022/frontal/01.jpg"


def test_zero_padded_crops_equal_crops_of_a_black_canvas() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    border = 20
    canvas = np.zeros((30 + 2 * border, 40 + 2 * border, 3), np.uint8)
    canvas[border:-border, border:-border] = image
    # Spans [top, bottom) x [left, right) crossing every edge, one inside, one covering the whole image.
    top = np.array([-7, 5, -3, 10, -20])
    bottom = np.array([12, 35, 27, 20, 50])
    left = np.array([-5, 30, 8, 10, -20])
    right = np.array([15, 52, 41, 25, 60])
    for size in (24, 48):
        got = IntegralImage(image).crops(top, bottom, left, right, size)
        want = IntegralImage(canvas).crops(top + border, bottom + border, left + border, right + border, size)
        np.testing.assert_array_equal(got, want)


def test_crop_windows_keep_the_box_span_only_with_zero_padding() -> None:
    boxes = np.array([[-4.7, 3.2, 20.9, 45.0], [60.0, 60.0, 70.0, 70.0]], np.float32)
    stretch = crop_windows(boxes, 30, 40, "stretch")
    zero = crop_windows(boxes, 30, 40, "zero")
    assert [int(v[0]) for v in stretch[:4]] == [2, 40, 0, 20]
    assert [int(v[0]) for v in zero[:4]] == [2, 45, -5, 20]
    np.testing.assert_array_equal(stretch[4], [True, False])  # a box outside the image is dropped either way
    np.testing.assert_array_equal(zero[4], [True, False])


def test_unknown_edge_padding_is_rejected() -> None:
    with pytest.raises(ValueError, match="edge_padding"):
        create_detector("mtcnn", edge_padding="mirror")


def test_pipeline_options_choose_zero_padding_for_mtcnn_only() -> None:
    assert pipeline_detector_options("mtcnn") == {"edge_padding": "zero"}
    assert pipeline_detector_options("mtcnn", {"edge_padding": "stretch", "batch_size": 2}) == {
        "edge_padding": "stretch", "batch_size": 2,
    }
    assert "edge_padding" not in pipeline_detector_options("retinaface", {"threshold": 0.3})
    assert pipeline_detector_options("scrfd", {"threshold": 0.3}) == {"threshold": 0.3}


def _mean_landmark_error(faces, reference: np.ndarray) -> float:
    assert faces, "no face found"
    return min(float(np.abs(np.asarray(face.landmarks) - reference).mean()) for face in faces)


def test_zero_padding_places_landmarks_of_a_frame_filling_face() -> None:
    image = read_image(shared_path(FRAME_FILLING))
    reference = create_detector("retinaface").detect([image])[0][0].landmarks
    stretch = create_detector("mtcnn").detect([image])[0]
    zero = create_detector("mtcnn", edge_padding="zero").detect([image])[0]
    assert _mean_landmark_error(stretch, reference) > 30  # the silent misalignment this option fixes
    assert _mean_landmark_error(zero, reference) < 5  # 4.4 px: about 3 % of the 137 px eye distance
    # Zero padding is what a black border around the image does (the evaluation commands' workaround).
    border = 92
    padded = cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_CONSTANT, value=0)
    bordered = create_detector("mtcnn").detect([padded])[0][0].landmarks - border
    assert _mean_landmark_error(zero, bordered) < 3


def test_align_and_detect_commands_use_zero_padding_for_mtcnn(tmp_path) -> None:
    import json
    import shutil

    from click.testing import CliRunner

    from facepipe.cli import main
    from facepipe.pipeline.align import AlignConfig, run_align
    from facepipe.pipeline.manifest import read_manifest
    from facepipe.pipeline.sources import directory_source

    source = tmp_path / "in"
    source.mkdir()
    shutil.copy(shared_path(FRAME_FILLING), source / "face.jpg")
    image = read_image(source / "face.jpg")
    reference = create_detector("retinaface").detect([image])[0][0].landmarks

    summary = run_align(AlignConfig(detector="mtcnn"), directory_source(source), tmp_path / "aligned", workers=0, progress=False)
    (row,) = read_manifest(summary.manifest_path)
    assert np.abs(np.asarray(row.landmarks[0]).reshape(5, 2) - reference).mean() < 5

    out = tmp_path / "faces.jsonl"
    result = CliRunner().invoke(main, ["detect", str(source), "--out", str(out), "--detector", "mtcnn"])
    assert result.exit_code == 0, result.output
    (face,) = json.loads(out.read_text())["faces"][:1]
    assert np.abs(np.asarray(face["landmarks"]) - reference).mean() < 5
