"""Quality measures and error-versus-reject curves against plain re-statements."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.evaluation.quality import error_versus_reject, threshold_at_fmr
from facepipe.quality import inter_ocular_distance, landmark_yaw, laplacian_sharpness

FRONTAL = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])


def test_yaw_is_zero_for_the_arcface_template_and_signed_by_the_nose_side():
    turned = FRONTAL.copy()
    turned[2, 0] += 12.0  # nose towards the image-right eye
    yaw = landmark_yaw(np.stack([FRONTAL, turned, FRONTAL[:, ::1] * [-1, 1]]))
    assert abs(yaw[0]) < 1.0 and yaw[1] > 25.0
    rotated = FRONTAL @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # 90° roll: yaw must not change
    assert landmark_yaw(rotated[None])[0] == pytest.approx(yaw[0], abs=1e-9)
    assert inter_ocular_distance(FRONTAL[None])[0] == pytest.approx(35.24, abs=0.01)


def test_sharpness_drops_with_blur():
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    import cv2

    blurred = cv2.GaussianBlur(crop, (9, 9), 3)
    sharp, soft = laplacian_sharpness(np.stack([crop, blurred]))
    assert sharp > 10 * soft


def _plain_evrc(quality, pairs, scores, issame, threshold, fraction):
    """Re-statement with loops: reject the floor(f·n) lowest faces, keep pairs with both faces kept."""
    n = len(quality)
    order = sorted(range(n), key=lambda i: (quality[i], i))
    rejected = set(order[: int(np.floor(fraction * n + 1e-9))])
    mated_kept = failures = 0
    for (a, b), score, same in zip(pairs, scores, issame):
        if a in rejected or b in rejected or not same:
            continue
        mated_kept += 1
        failures += not score > threshold
    return failures / mated_kept if mated_kept else 0.0


def test_curves_equal_a_plain_loop_and_informed_measures_beat_random():
    rng = np.random.default_rng(1)
    n_faces, n_pairs = 200, 1500
    pairs = rng.integers(0, n_faces, (n_pairs, 2))
    issame = rng.random(n_pairs) < 0.3
    face_quality = rng.random(n_faces)
    # mated scores fall with the worse face's quality: a measure that knows it must beat random
    scores = np.where(issame, 0.2 + 0.6 * face_quality[pairs].min(axis=1), 0.3 * rng.random(n_pairs)) + 0.05 * rng.standard_normal(n_pairs)
    report = error_versus_reject({"informed": face_quality, "noise": rng.random(n_faces)}, pairs, scores, issame, fmr=1e-2, steps=11)
    threshold = report.threshold
    assert np.mean(scores[~issame] > threshold) <= 1e-2
    assert np.mean(scores[~issame] >= threshold) > 1e-2 - 1.0 / np.sum(~issame)  # the lowest such threshold
    by_name = {c.name: c for c in report.curves}
    for name, quality in (("informed", face_quality),):
        for fraction, fnmr in zip(by_name[name].reject_fractions, by_name[name].fnmr):
            assert fnmr == pytest.approx(_plain_evrc(quality, pairs, scores, issame, threshold, fraction))
    assert by_name["informed"].fnmr[0] == pytest.approx(report.baseline_fnmr)
    area = dict(report.ranking())
    assert area["oracle"] < 0.5 * area["random"] and area["informed"] < 0.5 * area["random"]
    assert area["noise"] == pytest.approx(area["random"], rel=0.35)
    assert by_name["informed"].fnmr[-1] < by_name["informed"].fnmr[0]


def test_threshold_at_fmr_and_bad_input():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9])
    issame = np.array([False, False, False, False, True])
    assert threshold_at_fmr(scores, issame, 0.25) == pytest.approx(0.3)  # one of four non-mated above
    with pytest.raises(ValueError, match="finite"):
        error_versus_reject({}, np.array([[0, 1]]), np.array([np.nan]), np.array([True]))
    with pytest.raises(ValueError, match="no mated"):
        error_versus_reject({}, np.array([[0, 1]]), np.array([0.5]), np.array([False]))
