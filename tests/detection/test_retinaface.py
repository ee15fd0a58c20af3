import json

import cv2
import numpy as np
import pytest
import torch

from facepipe.detection.base import Detector, create_detector
from facepipe.detection.retinaface import (
    RetinaFaceDetector,
    RetinaFaceSettings,
    _short_side_resize,
    create_retinaface_mnet,
    create_retinaface_onnx,
    create_retinaface_r50,
)
from facepipe.models.retinaface import retinaface_r50
from facepipe.types import Face
from tests.conftest import shared_path

ODD_HEIGHT = "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg"
HUGE = ("images/group/biubug6_sample.jpg", "images/group/hpc203_selfie.jpg")
REFERENCE = dict(threshold=0.02, confidence_threshold=0.02, top_k=5000, nms_threshold=0.4, keep_top_k=750)


def read(key: str) -> np.ndarray:
    return cv2.imread(str(shared_path(*key.split("/"))), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def golden_dets():
    return np.load(shared_path("golden", "retinaface_mnet_shared.npz"))


def golden_keys(golden) -> list[str]:
    return sorted(k for k in golden.files if k != "__meta__")


def representative_keys(golden) -> list[str]:
    keys = golden_keys(golden)
    wider = [k for k in keys if k.startswith("widerface/")]
    chosen = ["images/group/t1.jpg", "images/group/mask_white.jpg", "images/group/Tom_Hanks_54745.png", ODD_HEIGHT]
    chosen += [k for k in keys if k.startswith("images/celebrities/")]
    chosen += wider[::17]
    return list(dict.fromkeys(chosen))


def assert_rows_match(ours: np.ndarray, reference: np.ndarray, key: str) -> int:
    """Every confident reference row is found (box & landmarks 0.5 px, score 2e-4) and vice versa.

    Returns how many low-scored reference rows had no counterpart (allowed near thresholds).
    """
    unmatched_low = 0
    for row in reference:
        if len(ours):
            distance = np.abs(ours[:, :4] - row[:4]).max(axis=1)
            j = int(distance.argmin())
            ok = (
                distance[j] <= 0.5
                and abs(ours[j, 4] - row[4]) <= 2e-4
                and np.abs(ours[j, 5:] - row[5:]).max() <= 0.5
            )
        else:
            ok = False
        if not ok:
            assert row[4] < 0.5, f"{key}: confident reference face {row[:5]} not reproduced"
            unmatched_low += 1
    assert (ours[:, 4] >= 0.5).sum() == (reference[:, 4] >= 0.5).sum(), key
    return unmatched_low


def check_parity(detector: RetinaFaceDetector, golden, keys: list[str]) -> None:
    rows = detector.detect_rows([read(k) for k in keys]) if len(keys) <= 8 else None
    total = unmatched = 0
    for i, key in enumerate(keys):
        ours = rows[i] if rows is not None else detector.detect_rows([read(key)])[0]
        reference = golden[key]
        assert ours.dtype == np.float32 and ours.shape[1] == 15
        assert np.all(np.diff(ours[:, 4]) <= 0)
        unmatched += assert_rows_match(ours, reference, key)
        total += len(reference)
    assert unmatched <= max(1, total // 100), f"{unmatched} of {total} low-scored reference rows not reproduced"


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_parity_with_reference_detections_on_a_representative_subset(golden_dets, backend):
    keys = representative_keys(golden_dets)
    if backend == "torch":
        keys = keys[:6]  # same numbers as auto; torch eager is the slower CPU path
    detector = create_retinaface_mnet(backend=backend, **REFERENCE)
    check_parity(detector, golden_dets, keys)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_parity_with_reference_detections_on_all_360_images(golden_dets, backend):
    detector = create_retinaface_mnet(backend=backend, **REFERENCE)
    check_parity(detector, golden_dets, golden_keys(golden_dets))


def test_reference_limits_bite_on_the_crowd_image(golden_dets):
    """keep_top_k = 750 and top_k = 5000 are applied as in the reference (the crowd has 10,185 candidates)."""
    key = HUGE[0]
    image = read(key)
    small = cv2.resize(image, None, fx=0.5, fy=0.5)
    detector = create_retinaface_mnet(**REFERENCE)
    limited = detector.with_settings(keep_top_k=20).detect_rows([small])[0]
    assert len(limited) == 20
    assert np.array_equal(limited, detector.detect_rows([small])[0][:20])
    meta = json.loads(str(golden_dets["__meta__"]))["images"][key]
    assert meta["n_above_conf"] > 5000 and len(golden_dets[key]) == 750


def test_t1_faces_at_default_threshold():
    detector = create_retinaface_mnet()
    assert isinstance(detector, Detector)
    faces = detector.detect([read("images/group/t1.jpg")])[0]
    assert len(faces) == 6 and all(isinstance(f, Face) for f in faces)
    assert all(f.score >= 0.5 for f in faces)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:  # landmarks inside their box, eyes above mouth, image-left eye left of image-right eye
        x1, y1, x2, y2 = face.box
        assert np.all((face.landmarks[:, 0] > x1) & (face.landmarks[:, 0] < x2))
        assert face.landmarks[0, 0] < face.landmarks[1, 0] and face.landmarks[0, 1] < face.landmarks[3, 1]
    assert detector.detect([read("images/group/mask_white.jpg")]) == [[]]
    assert detector.detect([]) == []


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_batched_detection_equals_one_by_one(backend):
    t1 = read("images/group/t1.jpg")
    group = read(ODD_HEIGHT)
    images = [t1, group, t1[:, ::-1].copy(), cv2.resize(group, (t1.shape[1], t1.shape[0])), group[::-1].copy(), t1[:300]]
    detector = create_retinaface_mnet(backend=backend, batch_size=2, **REFERENCE)
    batched = detector.detect_rows(images)
    single = [detector.detect_rows([image])[0] for image in images]
    for ours, alone in zip(batched, single):
        assert ours.shape == alone.shape
        assert np.abs(ours - alone).max(initial=0) <= 1e-4


def test_mirrored_image_gives_mirrored_faces_with_swapped_landmarks():
    image = read("images/group/t1.jpg")
    detector = create_retinaface_mnet()
    original = detector.detect_rows([image])[0]
    mirrored = detector.detect_rows([image[:, ::-1].copy()])[0]
    width = image.shape[1]
    assert len(mirrored) == len(original) == 6
    for row in original:
        x1, y1, x2, y2 = row[:4]
        j = np.abs(mirrored[:, :4] - [width - x2, y1, width - x1, y2]).max(axis=1).argmin()
        assert np.abs(mirrored[j, :4] - [width - x2, y1, width - x1, y2]).max() < 6
    # the multiscale flip pass maps mirrored detections back: landmarks keep image order
    flip_only = detector.with_settings(scale="multiscale", multiscale_sizes=(image.shape[0],), max_size=10_000)
    voted = flip_only.detect_rows([image])[0]
    assert len(voted) >= 6
    for row in original:
        j = np.abs(voted[:, :4] - row[:4]).max(axis=1).argmin()
        assert np.abs(voted[j, :4] - row[:4]).max() < 4
        assert np.abs(voted[j, 5:] - row[5:]).max() < 4  # a missing 0<->1 swap would move eyes by ~40 px


def test_fixed_scale_policy_follows_the_reference_resize_rule():
    assert _short_side_resize(886, 1280, 1600, 2150) == pytest.approx(2150 / 1280)  # long side capped
    assert _short_side_resize(300, 400, 1600, 2150) == pytest.approx(1600 / 300)
    image = read("images/group/t1.jpg")
    detector = create_retinaface_mnet(scale="fixed", target_size=443, max_size=2000)  # half size
    faces = detector.detect_rows([image])[0]
    original = create_retinaface_mnet().detect_rows([image])[0]
    assert len(faces) == 6
    for row in original:  # coordinates come back in original pixels
        assert np.abs(faces[:, :4] - row[:4]).max(axis=1).min() < 12


def test_multiscale_finds_the_faces_and_small_ones():
    image = read("images/group/t1.jpg")
    detector = create_retinaface_mnet(scale="multiscale", multiscale_sizes=(500, 1100))
    faces = detector.detect_rows([image])[0]
    original = create_retinaface_mnet().detect_rows([image])[0]
    assert len(faces) >= 6 and np.all(np.diff(faces[:, 4]) <= 0)
    for row in original:
        assert np.abs(faces[:, :4] - row[:4]).max(axis=1).min() < 8


def test_bad_input_and_options_are_refused():
    detector = create_retinaface_mnet()
    image = read("images/group/t1.jpg")
    with pytest.raises(ValueError, match="image 1: expected a uint8"):
        detector.detect([image, image.astype(np.float32)])
    with pytest.raises(ValueError, match="image 0"):
        detector.detect([image[:, :, 0]])
    with pytest.raises(ValueError, match="image 0"):
        detector.detect([np.zeros((0, 10, 3), np.uint8)])
    with pytest.raises(TypeError, match="unknown RetinaFace option"):
        create_retinaface_mnet(treshold=0.3)
    with pytest.raises(ValueError, match="scale"):
        RetinaFaceSettings(scale="huge")
    with pytest.raises(ValueError, match="threshold"):
        RetinaFaceSettings(threshold=1.5)
    with pytest.raises(ValueError, match="invalid RetinaFace setting"):
        RetinaFaceSettings(top_k="many")
    parsed = RetinaFaceSettings(max_size="1600", threshold=1, multiscale_sizes=[500, 900])  # CLI-style values
    assert parsed.max_size == 1600 and parsed.threshold == 1.0 and parsed.multiscale_sizes == (500, 900)
    with pytest.raises(ValueError, match="fp16"):
        create_retinaface_mnet(backend="torch", fp16=True)  # CPU


def test_factories_dispatch_and_r50_needs_weights(tmp_path):
    assert create_detector("retinaface").name == "retinaface"
    with pytest.raises(ValueError, match="Resnet50_Final.pth"):
        create_retinaface_r50()
    source = retinaface_r50()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "r50.pth")
    detector = create_detector("retinaface-r50", weights=str(tmp_path / "r50.pth"), backend="torch", threshold=0.0)
    small = cv2.resize(read("images/group/t1.jpg"), (160, 112))
    x = torch.from_numpy((small.astype(np.float32) - [104, 117, 123]).astype(np.float32).transpose(2, 0, 1)[None].copy())
    with torch.no_grad():
        expected = [t.numpy() for t in source(x)]
    outputs = detector.backend(x.numpy())
    for ours, theirs in zip(outputs, expected):
        assert np.abs(ours - theirs).max() < 1e-3
    assert isinstance(detector.detect([small])[0], list)


def test_tiny_onnx_runs_the_same_in_onnxruntime_and_in_torch():
    pytest.importorskip("onnxruntime")
    path = str(shared_path("weights", "retinaface", "retinaface_mnet025_tiny.onnx"))
    keys = ["images/group/t1.jpg", ODD_HEIGHT]
    in_ort = create_retinaface_onnx(weights=path, **REFERENCE)
    in_torch = create_detector("retinaface", weights=path, backend="torch", **REFERENCE)
    assert in_ort.backend.name == "onnxruntime-cpu" and in_torch.backend.name == "torch-cpu"
    for key in keys:
        a = in_ort.detect_rows([read(key)])[0]
        b = in_torch.detect_rows([read(key)])[0]
        assert assert_rows_match(a, b, key) <= 1
        assert assert_rows_match(b, a, key) <= 1
    assert (in_ort.detect_rows([read(keys[0])])[0][:, 4] >= 0.5).sum() == 6  # a working detector, not noise


def test_onnx_factory_without_weights_exports_the_bundled_model(golden_dets):
    pytest.importorskip("onnxruntime")
    detector = create_retinaface_onnx(**REFERENCE)
    assert detector.name == "retinaface-onnx"
    ours = detector.detect_rows([read("images/group/t1.jpg")])[0]
    assert assert_rows_match(ours, golden_dets["images/group/t1.jpg"], "t1") == 0


def test_preprocess_is_bgr_minus_mean_in_nchw():
    detector = create_retinaface_mnet(backend="torch")
    image = read(ODD_HEIGHT)
    batch = detector.preprocess([image, image[::-1].copy()])
    expected = (image.astype(np.float32) - np.array([104, 117, 123], np.float32)).transpose(2, 0, 1)
    assert batch.shape == (2, 3, 577, 1024) and batch.flags.c_contiguous
    assert np.array_equal(batch[0], expected) and np.array_equal(batch[1], expected[:, ::-1])
    with pytest.raises(ValueError, match="one shape"):
        detector.preprocess([image, image[:100]])
