"""The shared face step: padded detection maps faces back; the insightface keep rule; embed_pair."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.faces import choose_faces, detect_padded, pad_width
from facepipe.types import Face


def _face(x1, y1, x2, y2, score=0.9):
    landmarks = np.array([[x1 + 1, y1 + 1]] * 5, dtype=np.float32)
    return Face(np.array([x1, y1, x2, y2], dtype=np.float32), score, landmarks)


class _Recorder:
    """A detector that finds one face at a fixed place in whatever image it gets (records the shapes)."""

    def __init__(self):
        self.shapes = []

    def detect(self, images):
        self.shapes.extend(image.shape for image in images)
        return [[_face(10, 20, 30, 40)] for _ in images]


def test_pad_rounding_is_one_rule():
    assert pad_width((100, 60, 3), 0.0) == 0
    assert pad_width((100, 60, 3), 0.001) == 1  # never a 0-pixel border for a positive ratio
    assert pad_width((100, 60, 3), 0.25) == 25
    with pytest.raises(ValueError):
        pad_width((10, 10, 3), -0.1)


def test_detect_padded_returns_faces_in_original_coordinates():
    detector = _Recorder()
    images = [np.zeros((100, 60, 3), np.uint8), np.zeros((40, 80, 3), np.uint8)]
    faces = detect_padded(detector, images, pad_ratio=0.25)
    assert detector.shapes == [(150, 110, 3), (80, 120, 3)]
    np.testing.assert_allclose(faces[0][0].box, [-15, -5, 5, 15])
    np.testing.assert_allclose(faces[1][0].box, [-10, 0, 10, 20])
    assert detect_padded(detector, images[:1], 0.0)[0][0].box.tolist() == [10, 20, 30, 40]


def test_insightface_rule_prefers_a_big_face_near_the_centre():
    big_corner = _face(0, 0, 40, 40)  # area 1600, centre (20, 20): distance² to (100, 100) = 12800
    small_centre = _face(90, 90, 110, 110)  # area 400, at the centre
    chosen = choose_faces([big_corner, small_centre], (200, 200, 3), keep="insightface")
    assert chosen == [small_centre]
    assert choose_faces([big_corner, small_centre], (200, 200, 3), keep="largest") == [big_corner]


def test_embed_pair_equals_two_plain_calls():
    from facepipe.embedding import create_embedder

    embedder = create_embedder("mobilefacenet", backend="torch")
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (3, 112, 112, 3), dtype=np.uint8)
    plain, mirrored = embedder.embed_pair(crops)
    np.testing.assert_allclose(plain, embedder.embed(crops, flip=False), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mirrored, embedder.embed(crops[:, :, ::-1].copy(), flip=False), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(plain + mirrored, embedder.embed(crops, flip=True), rtol=1e-4, atol=1e-3)
