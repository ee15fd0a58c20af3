"""MTCNN cascade: parity with facenet-pytorch 2.6.0 (golden outputs), batching, NMS semantics, bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from facepipe.detection import Detector, create_detector
from facepipe.detection.mtcnn import (
    IntegralImage,
    MTCNNDetector,
    batched_nms,
    create_mtcnn,
    nms,
    nms_min,
    pyramid_scales,
    to_rgb,
)
from facepipe.models import CheckpointError
from tests.conftest import shared_path

cv2 = pytest.importorskip("cv2")

# Tolerances from the task: same faces, boxes and landmarks within 1 px, probabilities within 1e-4.
# (Measured here on all 77 golden images: 2.8e-4 px, 1.1e-6, 2.5e-4 px.)
PX_TOL = 1.0
PROB_TOL = 1e-4

DEFAULT_SUBSET = [
    "images/group/t1.jpg",
    "images/group/mask_white.jpg",
    "images/celebrities/002_331d0423.jpg",
    "images/celebrities/Elon_Musk.jpg",
    "images/celebrities/012_d461a2b5.jpg",
    "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg",
    "widerface/val_images/8--Election_Campain/8_Election_Campain_Election_Campaign_8_452.jpg",
    "widerface/val_images/24--Soldier_Firing/24_Soldier_Firing_Soldier_Firing_24_315.jpg",
]


@pytest.fixture(scope="module")
def golden_mtcnn():
    return np.load(shared_path("golden", "mtcnn_shared.npz"))


@pytest.fixture(scope="module")
def detector_area() -> MTCNNDetector:
    return create_mtcnn(order="area")


def _read(key: str) -> np.ndarray:
    image = cv2.imread(str(shared_path(*key.split("/"))), cv2.IMREAD_COLOR)
    assert image is not None, key
    return image


def _assert_parity(result, golden, key: str) -> None:
    boxes, probs, points = result
    g_boxes, g_probs, g_points = golden[f"{key}/boxes"], golden[f"{key}/probs"], golden[f"{key}/points"]
    assert boxes.shape == g_boxes.shape, f"{key}: {len(boxes)} faces, reference {len(g_boxes)}"
    np.testing.assert_allclose(boxes, g_boxes, rtol=0, atol=PX_TOL, err_msg=key)
    np.testing.assert_allclose(probs, g_probs, rtol=0, atol=PROB_TOL, err_msg=key)
    np.testing.assert_allclose(points, g_points, rtol=0, atol=PX_TOL, err_msg=key)


def _decoded_md5s() -> dict[str, str]:
    """md5 of each golden image's decoded BGR pixels (recorded in the RetinaFace golden metadata)."""
    meta = json.loads(str(np.load(shared_path("golden", "retinaface_mnet_shared.npz"))["__meta__"]))
    return {key: info["bgr_md5"] for key, info in meta["images"].items()}


@pytest.mark.shared
def test_t1_matches_facenet_pytorch_exactly(golden_mtcnn, detector_area) -> None:
    key = "images/group/t1.jpg"
    result = detector_area.detect_arrays([_read(key)])[0]
    _assert_parity(result, golden_mtcnn, key)
    boxes, probs, points = result
    assert len(probs) == 8  # 6 large faces and two small boxes, as documented for the reference
    # Much tighter than the task tolerance: the cascade reproduces the reference arithmetic.
    np.testing.assert_allclose(boxes, golden_mtcnn[f"{key}/boxes"], rtol=0, atol=1e-2)
    np.testing.assert_allclose(probs, golden_mtcnn[f"{key}/probs"], rtol=0, atol=1e-5)
    # Image order: the left eye is left of the right eye, mouth below the eyes, on every frontal face.
    assert (points[:6, 0, 0] < points[:6, 1, 0]).all()
    assert (points[:6, 3, 1] > points[:6, 0, 1]).all()


@pytest.mark.shared
def test_default_subset_matches_facenet_pytorch_in_one_batch(golden_mtcnn, detector_area) -> None:
    """Several sizes in one call (grouped by size internally) give each image its single-image reference result."""
    images = [_read(key) for key in DEFAULT_SUBSET]
    md5s = _decoded_md5s()
    for key, image in zip(DEFAULT_SUBSET, images):  # a decoder difference is not a model difference
        assert hashlib.md5(image.tobytes()).hexdigest() == md5s[key], f"decoded pixels differ: {key}"
    for key, result in zip(DEFAULT_SUBSET, detector_area.detect_arrays(images)):
        _assert_parity(result, golden_mtcnn, key)


@pytest.mark.slow
@pytest.mark.shared
def test_all_77_golden_images_match_facenet_pytorch(golden_mtcnn, detector_area) -> None:
    for key in (str(k) for k in golden_mtcnn["__keys__"]):
        _assert_parity(detector_area.detect_arrays([_read(key)])[0], golden_mtcnn, key)


@pytest.mark.shared
def test_same_size_batch_equals_single_calls(detector_area) -> None:
    image = _read("images/celebrities/Elon_Musk.jpg")
    flipped = np.ascontiguousarray(image[:, ::-1])
    single = [detector_area.detect_arrays([im])[0] for im in (image, flipped)]
    batched = MTCNNDetector(
        detector_area.pnet, detector_area.rnet, detector_area.onet, order="area", batch_size=2
    ).detect_arrays([image, flipped])
    for one, both in zip(single, batched):
        assert len(one[1]) == len(both[1]) >= 1
        for a, b in zip(one, both):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    # The mirrored face is found at the mirrored place (MTCNN is not exactly mirror-symmetric: 5% of the width).
    width = image.shape[1]
    box = single[0][0][0]
    np.testing.assert_allclose(width - single[1][0][0, [2, 0]], box[[0, 2]], atol=0.05 * (box[2] - box[0]))


@pytest.mark.shared
def test_score_order_is_the_detector_protocol(golden_mtcnn) -> None:
    detector = create_detector("mtcnn")
    assert isinstance(detector, Detector) and detector.name == "mtcnn"
    key = "images/group/t1.jpg"
    faces = detector.detect([_read(key)])[0]
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(sorted(scores), np.sort(golden_mtcnn[f"{key}/probs"]), atol=PROB_TOL)


@pytest.mark.shared
def test_grayscale_input_equals_its_bgr_conversion(detector_area) -> None:
    grey = cv2.cvtColor(_read("images/group/t1.jpg"), cv2.COLOR_BGR2GRAY)
    # One call each: a call with two same-size images runs P-Net on both at once, and oneDNN may round a batch of
    # two differently from one image (~1e-7 relative; see test_same_size_batch_equals_single_calls).
    from_grey = [detector_area.detect_arrays([image])[0] for image in (grey, grey[:, :, None])]
    from_bgr = detector_area.detect_arrays([cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)])[0]
    assert len(from_bgr[1]) >= 5  # the six large faces survive the loss of colour (most of them)
    for result in from_grey:
        for a, b in zip(result, from_bgr):
            np.testing.assert_array_equal(a, b)


def test_tiny_and_empty_images_give_no_faces(detector_area) -> None:
    images = [
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((0, 40, 3), np.uint8),
        np.full((1, 1, 3), 255, np.uint8),
        np.full((11, 300, 3), 90, np.uint8),  # short side below one 12-px P-Net cell at min_face_size=20
        np.full((64, 64, 3), 128, np.uint8),  # large enough, but flat
    ]
    assert detector_area.detect(images) == [[], [], [], [], []]
    assert detector_area.detect([]) == []


def test_bad_input_raises_clear_errors(detector_area) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector_area.detect([np.zeros((32, 32, 3), np.float32)])
    with pytest.raises(ValueError, match="shape"):
        detector_area.detect([np.zeros((32, 32, 5), np.uint8)])
    with pytest.raises(TypeError, match="numpy"):
        detector_area.detect([[[0, 0, 0]]])
    with pytest.raises(TypeError, match="sequence of images"):
        detector_area.detect(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="order"):
        create_mtcnn(order="largest")
    with pytest.raises(ValueError, match="factor"):
        create_mtcnn(factor=1.2)
    with pytest.raises(ValueError, match="thresholds"):
        create_mtcnn(thresholds="0.6,0.7,0.7")
    with pytest.raises(ValueError, match="unknown MTCNN option.*threshold"):
        create_detector("mtcnn", threshold=0.9)


def test_colour_conversion() -> None:
    bgr = np.array([[[1, 2, 3]]], np.uint8)
    assert to_rgb(bgr).tolist() == [[[3, 2, 1]]]
    assert to_rgb(np.array([[[1, 2, 3, 4]]], np.uint8)).tolist() == [[[3, 2, 1]]]  # BGRA: alpha dropped
    assert to_rgb(np.array([[7]], np.uint8)).tolist() == [[[7, 7, 7]]]


def test_pyramid_scales_follow_the_reference_rule() -> None:
    scales = pyramid_scales(100, 200, min_face_size=20, factor=0.709)
    assert scales[0] == pytest.approx(0.6)
    assert len(scales) == 5  # short side 60, 42.5, 30.2, 21.4, 15.2 px >= 12; the next (10.7) is not
    np.testing.assert_allclose(np.diff(np.log(scales)), np.log(0.709))
    assert pyramid_scales(19, 19, 20, 0.709) == []


@pytest.mark.parametrize("table", ["int32", "float64"])
def test_area_resize_is_bit_identical_to_torch_area_interpolation(table: str, monkeypatch) -> None:
    if table == "float64":  # the summed-area table of images above ~8.4 Mpx; forced here on a small one
        monkeypatch.setattr("facepipe.detection.mtcnn.INT32_SAFE_PIXELS", 100)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    integral = IntegralImage(rgb)
    assert integral.table.dtype == np.dtype(table)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    for size in [(59, 80), (30, 41), (12, 17), (150, 200)]:
        expected = torch.nn.functional.interpolate(tensor, size=size, mode="area")[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(integral.resize(*size), expected)
    top, bottom = np.array([0, 10, 90]), np.array([97, 17, 97])
    left, right = np.array([0, 100, 3]), np.array([131, 131, 5])
    for size in (24, 48):
        crops = integral.crops(top, bottom, left, right, size)
        for k in range(3):
            patch = tensor[:, :, top[k]:bottom[k], left[k]:right[k]]
            expected = torch.nn.functional.interpolate(patch, size=(size, size), mode="area")[0].permute(1, 2, 0)
            np.testing.assert_array_equal(crops[k], expected.numpy())


def test_nms_follows_torchvision_semantics() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.9, 0.8, 0.7, 0.95], np.float32)
    # Box 4 wins; 0 and 1 are identical to it (IoU 1); box 2 has IoU 50/150 = 1/3 with it.
    assert nms(boxes, scores, 0.5).tolist() == [4, 2, 3]
    # Suppress only when IoU > threshold: at exactly 1/3 box 2 survives, just below it does not.
    assert 2 in nms(boxes, scores, np.float32(1 / 3)).tolist()
    assert 2 not in nms(boxes, scores, 0.33).tolist()
    # Score ties are visited in index order.
    assert nms(boxes[:2], scores[:2], 0.5).tolist() == [0]
    # Degenerate (zero-area) boxes give NaN IoU with each other and never suppress.
    flat = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    assert nms(flat, np.array([0.5, 0.6], np.float32), 0.5).tolist() == [1, 0]


def test_batched_nms_keeps_groups_apart_in_both_torchvision_strategies() -> None:
    rng = np.random.default_rng(1)
    for n in (300, 2500):  # below and above torchvision's 1000-box switch
        xy = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2)).astype(np.float32)], axis=1)
        boxes = np.floor(boxes)  # P-Net boxes are integers: the offset trick is exact for them
        scores = rng.uniform(0, 1, n).astype(np.float32)
        groups = rng.integers(0, 3, n)
        kept = batched_nms(boxes, scores, groups, 0.5)
        expected = np.concatenate([np.flatnonzero(groups == g)[nms(boxes[groups == g], scores[groups == g], 0.5)] for g in range(3)])
        assert sorted(kept.tolist()) == sorted(expected.tolist())
        assert (np.diff(scores[kept]) <= 0).all()


def test_min_nms_uses_the_smaller_area_and_plus_one() -> None:
    # A small box inside a big one: IoU is small but overlap / smaller area is 1, so it goes.
    boxes = np.array([[0, 0, 99, 99], [10, 10, 19, 19], [200, 200, 209, 209]], np.float32)
    scores = np.array([0.99, 0.98, 0.97], np.float32)
    assert nms_min(boxes, scores, 0.7).tolist() == [0, 2]
    assert nms(boxes, scores, 0.7).tolist() == [0, 1, 2]
    # +1 areas: [0,0,9,9] is 100 px; [5,0,14,9] overlaps it on 5 * 10 = 50 px -> 0.5 <= 0.7, kept.
    pair = np.array([[0, 0, 9, 9], [5, 0, 14, 9]], np.float32)
    assert nms_min(pair, np.array([0.9, 0.8], np.float32), 0.7).tolist() == [0, 1]
    assert nms_min(pair, np.array([0.9, 0.8], np.float32), 0.4).tolist() == [0]


@pytest.mark.shared
def test_weights_from_a_facenet_pytorch_folder_and_a_combined_file(tmp_path) -> None:
    folder = shared_path("weights", "mtcnn")
    image = _read("images/celebrities/Elon_Musk.jpg")
    expected = create_mtcnn().detect_arrays([image])[0]
    from_folder = create_mtcnn(weights=folder).detect_arrays([image])[0]
    combined = {}
    for net in ("pnet", "rnet", "onet"):
        state = torch.load(folder / f"{net}.pt", map_location="cpu", weights_only=True)
        combined.update({f"{net}.{k}": v for k, v in state.items()})
    torch.save(combined, tmp_path / "mtcnn.pt")  # what torch.save(facenet_pytorch.MTCNN().state_dict()) holds
    from_file = create_mtcnn(weights=tmp_path / "mtcnn.pt").detect_arrays([image])[0]
    for result in (from_folder, from_file):
        for a, b in zip(result, expected):
            np.testing.assert_array_equal(a, b)


def test_mismatched_weights_are_rejected(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no rnet weights"):
        (tmp_path / "pnet.pt").write_bytes(b"")
        create_mtcnn(weights=tmp_path)
    from facepipe.weights import bundled

    state = torch.load(bundled("mtcnn_onet.pt"), map_location="cpu", weights_only=True)
    combined = {f"pnet.{k}": v for k, v in state.items()}  # O-Net tensors under the P-Net prefix
    combined.update({f"rnet.{k}": v for k, v in torch.load(bundled("mtcnn_rnet.pt"), weights_only=True).items()})
    combined.update({f"onet.{k}": v for k, v in state.items()})
    torch.save(combined, tmp_path / "swapped.pt")
    with pytest.raises(CheckpointError, match=r"(?s)\[pnet\].*(unexpected|mis-shaped)"):
        create_mtcnn(weights=tmp_path / "swapped.pt")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a combined MTCNN state dict"):
        create_mtcnn(weights=tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not found"):
        create_mtcnn(weights=tmp_path / "absent.pt")


def _one_by_one_nms(boxes, scores, threshold, min_mode):
    """The textbook loop (torchvision's kernel / facenet-pytorch's nms_numpy) as an oracle for the blocked NMS."""
    one = np.float32(1 if min_mode else 0)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = list(np.argsort(scores)[::-1] if min_mode else np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        i, rest = order[0], np.array(order[1:], dtype=np.int64)
        keep.append(i)
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        with np.errstate(invalid="ignore", divide="ignore"):
            if min_mode:
                stay = (w * h) / np.minimum(areas[i], areas[rest]) <= np.float32(threshold)
            else:
                stay = ~(((w * h) / (areas[i] + areas[rest] - w * h)).astype(np.float64) > threshold)
        order = list(rest[stay])
    return keep


@pytest.mark.parametrize("n", [1500, 40])  # several 256-box blocks; few enough boxes to test every pair
@pytest.mark.parametrize("min_mode", [False, True])
def test_blocked_nms_equals_the_one_by_one_loop(min_mode: bool, n: int) -> None:
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 300, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(4, 60, (n, 2)).astype(np.float32)], axis=1)
    boxes[::5] = np.floor(boxes[::5])
    duplicate, degenerate = (97, 211) if n > 100 else (9, 13)
    boxes[1::duplicate] = boxes[0]  # exact duplicates
    boxes[3::degenerate, 2] = boxes[3::degenerate, 0] - 1  # zero area in the +1 convention (0/0 overlaps: NaN)
    boxes[4::degenerate, 3] = boxes[4::degenerate, 1]  # zero area without +1
    scores = np.round(rng.uniform(0.5, 1, n), 2).astype(np.float32)  # many exact ties
    for threshold in (0.3, 0.5, 0.7):
        blocked = (nms_min if min_mode else nms)(boxes, scores, threshold)
        assert blocked.tolist() == _one_by_one_nms(boxes, scores, threshold, min_mode)
