"""The blocked NMS keeps exactly the rows, in exactly the order, of the reference ``py_cpu_nms`` loop."""

import numpy as np
import pytest

from facepipe.detection import box_ops
from facepipe.detection.box_ops import decode, nms
from tests.conftest import shared_path


def py_cpu_nms(dets: np.ndarray, thresh: float) -> np.ndarray:
    """Pytorch_Retinaface ``utils/nms/py_cpu_nms.py``, line for line (the oracle)."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            ovr = inter / (areas[i] + areas[order[1:]] - inter)
        inds = np.where(ovr <= thresh)[0]
        order = order[inds + 1]
    return np.asarray(keep, dtype=np.int64)


def random_dets(rng: np.random.Generator, n: int, dtype=np.float32, tied_scores: bool = False, spread: float = 600.0) -> np.ndarray:
    corner = rng.uniform(0, spread, size=(n, 2))
    size = rng.uniform(1, 120, size=(n, 2))
    scores = rng.choice(rng.uniform(0, 1, 12), n) if tied_scores else rng.uniform(0, 1, n)
    return np.hstack([corner, corner + size, scores[:, None]]).astype(dtype)


@pytest.mark.parametrize("seed", range(8))
def test_nms_equals_the_reference_loop_on_crowded_boxes(seed):
    rng = np.random.default_rng(seed)
    # several blocks of candidates, ties in score (argsort order decides), float32 and float64, whole pixels
    n = int(rng.integers(1, 3 * box_ops.NMS_BLOCK + 40))
    dets = random_dets(rng, n, np.float32 if seed % 2 else np.float64, tied_scores=seed % 3 == 0)
    if seed % 4 == 0:
        dets[:, :4] = np.round(dets[:, :4])
    for threshold in (0.1, 0.4, 0.7):
        expected = py_cpu_nms(dets, threshold)
        kept = nms(dets, threshold)
        assert kept.dtype == np.int64
        np.testing.assert_array_equal(kept, expected)


def test_limit_and_min_score_equal_slicing_and_filtering_the_full_result():
    rng = np.random.default_rng(7)
    dets = random_dets(rng, 700, tied_scores=True, spread=300.0)
    full = py_cpu_nms(dets, 0.4)
    assert len(full) > 40
    for limit in (1, 17, len(full), len(full) + 5):
        np.testing.assert_array_equal(nms(dets, 0.4, limit=limit), full[:limit])
    for min_score in (0.0, float(np.median(dets[:, 4])), 0.99, 1.5):
        expected = full[dets[full, 4] >= min_score]
        np.testing.assert_array_equal(nms(dets, 0.4, min_score=min_score), expected)
        np.testing.assert_array_equal(nms(dets, 0.4, limit=9, min_score=min_score), expected[:9])


def test_long_chains_of_overlaps_finish_box_by_box_with_the_same_result():
    # Each box overlaps only its neighbours and scores lower than the one before: greedy keeps every other box,
    # one decision per round, so the rounds run out and the in-order finish decides the rest.
    n = box_ops.NMS_BLOCK + 50
    x = np.arange(n, dtype=np.float32) * 5
    dets = np.stack([x, np.zeros(n), x + 9, np.full(n, 9), 1 - np.arange(n) / n], axis=1).astype(np.float32)
    expected = py_cpu_nms(dets, 0.3)
    assert len(expected) == (n + 1) // 2
    np.testing.assert_array_equal(nms(dets, 0.3), expected)


def test_degenerate_boxes_are_treated_as_the_reference_treats_them():
    # A box with -1 width has area 0: against itself 0/0 = NaN, which the reference counts as "suppress".
    dets = np.array(
        [[10, 10, 9, 20, 0.9], [10, 10, 9, 20, 0.8], [0, 0, 5, 5, 0.7], [0, 0, 5, 5, 0.7], [30, 30, 40, 40, 0.1]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(nms(dets, 0.4), py_cpu_nms(dets, 0.4))
    assert nms(np.zeros((0, 5), np.float32), 0.4, limit=3, min_score=0.5).tolist() == []


def test_nms_equals_the_reference_on_real_retinaface_candidates():
    raw = np.load(shared_path("golden", "retinaface_mnet_shared_raw.npz"))
    key = "images/group/t1.jpg"
    height, width = (int(v) for v in raw[f"{key}/shape"][:2])
    scores = raw[f"{key}/conf"][0, :, 1]
    order = np.where(scores > 0.02)[0]
    order = order[scores[order].argsort()[::-1]][:5000]
    boxes = decode(raw[f"{key}/loc"][0][order], raw[f"{key}/priors"][order]) * np.array([width, height] * 2, np.float32)
    dets = np.hstack([boxes, scores[order, None]]).astype(np.float32)
    assert len(dets) > box_ops.NMS_BLOCK  # more than one block of real candidates
    expected = py_cpu_nms(dets, 0.4)
    np.testing.assert_array_equal(nms(dets, 0.4), expected)
    np.testing.assert_array_equal(nms(dets, 0.4, limit=750, min_score=0.5), expected[dets[expected, 4] >= 0.5][:750])
