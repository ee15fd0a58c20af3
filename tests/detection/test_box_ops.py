import numpy as np
import pytest
import torch

from facepipe.detection.box_ops import box_iou, box_voting, decode, decode_landmarks, nms
from facepipe.detection.priors import num_priors, prior_boxes
from tests.conftest import shared_path


def test_prior_count_and_layout():
    priors = prior_boxes(640, 640)
    assert priors.shape == (16800, 4) and priors.dtype == np.float32
    assert num_priors(640, 640) == 16800
    # level 0 (stride 8), row 0, col 0: both min sizes at the same centre, then col 1
    np.testing.assert_allclose(priors[0], [4 / 640, 4 / 640, 16 / 640, 16 / 640], rtol=1e-6)
    np.testing.assert_allclose(priors[1], [4 / 640, 4 / 640, 32 / 640, 32 / 640], rtol=1e-6)
    np.testing.assert_allclose(priors[2], [12 / 640, 4 / 640, 16 / 640, 16 / 640], rtol=1e-6)
    # first prior of level 1 follows the 80*80*2 level-0 priors
    np.testing.assert_allclose(priors[12800], [8 / 640, 8 / 640, 64 / 640, 64 / 640], rtol=1e-6)


def test_priors_odd_size_use_ceil_and_are_cached_read_only():
    priors = prior_boxes(577, 1024)
    assert len(priors) == 2 * (73 * 128 + 37 * 64 + 19 * 32)
    assert prior_boxes(577, 1024) is priors
    with pytest.raises(ValueError):
        priors[0, 0] = 1.0
    with pytest.raises(ValueError):
        prior_boxes(0, 10)


def test_priors_equal_the_reference_bit_for_bit():
    golden = np.load(shared_path("golden", "retinaface_mnet_shared_raw.npz"))
    for key in ("images/group/t1.jpg", "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg"):
        height, width = (int(v) for v in golden[f"{key}/shape"][:2])
        assert np.array_equal(prior_boxes(height, width), golden[f"{key}/priors"])


def test_decode_by_hand():
    priors = np.array([[0.5, 0.5, 0.2, 0.4]], dtype=np.float32)
    assert np.allclose(decode(np.zeros((1, 4), np.float32), priors), [[0.4, 0.3, 0.6, 0.7]])
    loc = np.array([[1.0, -2.0, np.log(2) / 0.2, 0.0]], dtype=np.float32)
    # centre moves by 0.1 * offset * prior size; width doubles
    cx, cy, w, h = 0.5 + 0.1 * 0.2, 0.5 - 0.2 * 0.4, 0.4, 0.4
    assert np.allclose(decode(loc, priors), [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]], atol=1e-6)
    points = decode_landmarks(np.tile([[1.0, 0.0]], (1, 5)).astype(np.float32), priors)
    assert np.allclose(points.reshape(5, 2), [[0.52, 0.5]] * 5)


def test_decode_numpy_and_torch_agree_and_broadcast_over_batches():
    rng = np.random.default_rng(0)
    priors = prior_boxes(64, 96)
    loc = rng.normal(size=(3, len(priors), 4)).astype(np.float32)
    landms = rng.normal(size=(3, len(priors), 10)).astype(np.float32)
    boxes = decode(loc, priors)
    assert boxes.shape == (3, len(priors), 4)
    assert np.allclose(boxes[1], decode(loc[1], priors))
    torch_boxes = decode(torch.from_numpy(loc), torch.from_numpy(priors.copy()))
    assert np.allclose(torch_boxes.numpy(), boxes, atol=1e-6)
    torch_points = decode_landmarks(torch.from_numpy(landms), torch.from_numpy(priors.copy()))
    assert np.allclose(torch_points.numpy(), decode_landmarks(landms, priors), atol=1e-6)


def test_box_iou_values():
    a = np.array([[0, 0, 10, 10]], dtype=np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32)
    assert np.allclose(box_iou(a, b), [[50 / 150, 0.0, 1.0]])
    assert np.allclose(box_iou(a, b, plus_one=True)[0, 0], 66 / (121 + 121 - 66))
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    assert box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]])[0, 0] == 0.0  # degenerate, no division by zero


def test_nms_uses_plus_one_areas_and_keeps_ties_at_threshold():
    # IoU without +1 = 50/150 = 0.333, with +1 = 66/176 = 0.375
    dets = np.array([[0, 0, 10, 10, 0.9], [5, 0, 15, 10, 0.8]], dtype=np.float32)
    assert nms(dets, 0.35).tolist() == [0]  # suppressed only under the +1 convention
    assert nms(dets, 0.375).tolist() == [0, 1]  # IoU equal to the threshold is kept (<=)
    assert nms(np.zeros((0, 5), np.float32), 0.4).tolist() == []
    with pytest.raises(ValueError):
        nms(np.zeros((3, 4)), 0.4)


def test_nms_invariants_on_random_boxes():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, size=(400, 2))
    wh = rng.uniform(5, 60, size=(400, 2))
    dets = np.hstack([xy, xy + wh, rng.uniform(size=(400, 1))]).astype(np.float32)
    keep = nms(dets, 0.4)
    iou = box_iou(dets[:, :4], dets[:, :4], plus_one=True)
    kept = dets[keep]
    assert np.all(np.diff(kept[:, 4]) <= 0)  # score order
    sub = iou[np.ix_(keep, keep)]
    assert np.all(sub[~np.eye(len(keep), dtype=bool)] <= 0.4 + 1e-6)
    suppressed = np.setdiff1d(np.arange(len(dets)), keep)
    for i in suppressed:  # every dropped box overlaps a kept box of higher score
        better = keep[dets[keep, 4] >= dets[i, 4]]
        assert np.any(iou[i, better] > 0.4 - 1e-6)


def test_box_voting_merges_clusters_with_score_weights():
    dets = np.array(
        [
            [0, 0, 10, 10, 0.9, 1, 1],
            [2, 0, 12, 10, 0.3, 3, 1],  # overlaps the first (IoU 0.69)
            [50, 50, 60, 60, 0.5, 7, 7],  # alone
        ],
        dtype=np.float32,
    )
    merged = box_voting(dets, 0.4)
    assert merged.shape == (2, 7)
    expected = (0.9 * dets[0] + 0.3 * dets[1]) / 1.2
    expected[4] = 0.9
    np.testing.assert_allclose(merged[0], expected, rtol=1e-6)
    np.testing.assert_allclose(merged[1], dets[2])
    assert box_voting(np.zeros((0, 15), np.float32)).shape == (0, 15)
