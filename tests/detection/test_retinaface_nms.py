"""RetinaFace's NMS skips candidates under ``threshold`` (single scale) without changing a returned face."""

import cv2
import numpy as np
import pytest

from facepipe.detection.retinaface import create_retinaface_mnet
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def detector():
    return create_retinaface_mnet(threshold=0.02, intra_op_threads=1)


@pytest.mark.parametrize("keep_top_k", [750, 6])
def test_rows_over_the_threshold_are_those_of_the_full_reference_rows(detector, keep_top_k):
    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")), cv2.IMREAD_COLOR)
    everything = detector.with_settings(keep_top_k=keep_top_k).detect_rows([image])[0]
    for threshold in (0.3, 0.5, 0.9):
        rows = detector.with_settings(threshold=threshold, keep_top_k=keep_top_k).detect_rows([image])[0]
        expected = everything[everything[:, 4] >= threshold]
        assert len(expected) > 0
        np.testing.assert_array_equal(rows, expected)
