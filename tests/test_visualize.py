"""Drawing detections: every landmark in its own colour at its own place, box on the box, input untouched."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from facepipe.types import LANDMARK_NAMES, Face
from facepipe.visualize import BOX_COLOR, LANDMARK_COLORS, draw_faces, save_image


def _face() -> Face:
    landmarks = [[60, 70], [100, 70], [80, 90], [65, 110], [95, 110]]
    return Face([40, 50, 120, 140], 0.987, landmarks)


def test_landmarks_and_box_are_drawn_in_their_colours():
    image = np.full((200, 300, 3), 128, dtype=np.uint8)
    drawn = draw_faces(image, [_face()])
    assert np.all(image == 128)  # the input is not modified
    for (x, y), name in zip(_face().landmarks.astype(int), LANDMARK_NAMES):
        np.testing.assert_array_equal(drawn[y, x], LANDMARK_COLORS[name])
    np.testing.assert_array_equal(drawn[95, 40], BOX_COLOR)  # left edge, mid height
    np.testing.assert_array_equal(drawn[140, 80], BOX_COLOR)  # bottom edge
    np.testing.assert_array_equal(drawn[100, 200], [128, 128, 128])  # far from the face
    assert len({tuple(c) for c in LANDMARK_COLORS.values()} | {BOX_COLOR}) == 6


def test_score_label_is_written():
    image = np.full((200, 300, 3), 128, dtype=np.uint8)
    with_score = draw_faces(image, [_face()], show_scores=True)
    without = draw_faces(image, [_face()], show_scores=False)
    label_area = (slice(20, 50), slice(40, 100))  # above the box's top-left corner
    assert np.any(with_score[label_area] != without[label_area])
    assert np.any(with_score[label_area].reshape(-1, 3).sum(1) == 0)  # black text on the box colour


def test_no_faces_is_a_plain_copy_and_bad_images_are_refused(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(draw_faces(image, []), image)
    with pytest.raises(ValueError, match="uint8"):
        draw_faces(image.astype(np.float32), [])
    save_image(tmp_path / "sub" / "copy.png", image)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "sub" / "copy.png")), image)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["copy.png"]  # no temporary file left behind
