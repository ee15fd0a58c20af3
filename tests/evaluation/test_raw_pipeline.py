import cv2
import numpy as np
import pytest

from facepipe.detection.base import create_detector
from facepipe.embedding.base import create_embedder
from facepipe.evaluation.raw_pipeline import (
    STATUS_DETECTED,
    STATUS_FALLBACK,
    FeatureCache,
    PipelineSpec,
    align_batch,
    center_crop_fallback,
    choose_face,
    extract_features,
)
from facepipe.io.images import read_image
from facepipe.types import Face
from tests.conftest import shared_path


def _face(x1, y1, x2, y2, score=0.99):
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return Face([x1, y1, x2, y2], score, [[cx - 5, cy - 5], [cx + 5, cy - 5], [cx, cy], [cx - 4, cy + 5], [cx + 4, cy + 5]])


def test_choose_face_prefers_big_and_central_and_respects_min_score():
    shape = (200, 200, 3)
    central_small = _face(80, 80, 120, 120)  # area 1600, centred
    corner_big = _face(0, 0, 60, 60)  # area 3600, centre (30, 30): 2 * (70^2 + 70^2) = 19600 penalty
    assert choose_face([corner_big, central_small], shape) is central_small
    near_big = _face(70, 70, 150, 150)  # area 6400, centre (110, 110): penalty 400
    assert choose_face([central_small, near_big], shape) is near_big
    assert choose_face([_face(80, 80, 120, 120, score=0.3)], shape) is None
    assert choose_face([_face(80, 80, 120, 120, score=0.3)], shape, min_score=0.2) is not None
    assert choose_face([], shape) is None


def test_center_crop_fallback_hand_computed():
    height, width = 600, 800
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = (np.arange(width) % 256)[None, :]
    image[..., 1] = (np.arange(height) % 256)[:, None]
    # Border 6.25 %: x 50..750, y 37..563; widened by 22 px: x 28..772, y 15..585.
    expected = cv2.resize(image[15:585, 28:772], (112, 112), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(center_crop_fallback(image), expected)
    small = np.full((100, 80, 3), 7, np.uint8)  # the widened box covers the whole image
    np.testing.assert_array_equal(center_crop_fallback(small), np.full((112, 112, 3), 7, np.uint8))


@pytest.fixture(scope="module")
def retinaface():
    return create_detector("retinaface")


@pytest.fixture(scope="module")
def mobilefacenet():
    return create_embedder("mobilefacenet")


def _cfp_images(n):
    root = shared_path("cfp", "cfp-dataset", "Data", "Images")
    return [str(p) for p in sorted(root.glob("00[12]/frontal/*.jpg"))[:n]]


class CountingDetector:
    """The real detector, counting how many images it is asked to look at."""

    def __init__(self, detector):
        self.detector = detector
        self.name = detector.name
        self.seen = 0

    def detect(self, images):
        self.seen += len(images)
        return self.detector.detect(images)


def test_cache_reuses_work_and_survives_interruption(tmp_path, retinaface, mobilefacenet):
    keys = _cfp_images(6)
    spec = PipelineSpec("retinaface", None, "mobilefacenet", None)
    counting = CountingDetector(retinaface)
    loads = []

    def flaky_load(key):
        loads.append(key)
        if len(loads) == 5:
            raise KeyboardInterrupt  # killed mid-run, after two batches of 2
        return read_image(key)

    with pytest.raises(KeyboardInterrupt):
        extract_features(keys, flaky_load, counting, mobilefacenet, spec, cache_dir=tmp_path, batch_size=2,
                         save_every=2, progress=False)
    assert FeatureCache(tmp_path, spec).lookup(keys)[1] == keys[4:]  # the first 4 were saved
    counting.seen = 0
    features = extract_features(keys, read_image, counting, mobilefacenet, spec, cache_dir=tmp_path, batch_size=2,
                                progress=False)
    assert counting.seen == 2  # only the missing ones
    assert features.keys == keys and features.embedding.shape == (6, 128)
    assert (features.status == STATUS_DETECTED).all()
    fresh = extract_features(keys[::-1], read_image, retinaface, mobilefacenet, spec, cache_dir=None, batch_size=4,
                             progress=False)
    np.testing.assert_allclose(fresh.take(keys).embedding, features.embedding, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fresh.take(keys).faces, features.faces, atol=1e-3)
    counting.seen = 0
    again = extract_features(keys, read_image, counting, mobilefacenet, spec, cache_dir=tmp_path, progress=False)
    assert counting.seen == 0
    np.testing.assert_array_equal(again.embedding_flip, features.embedding_flip)
    # A different setting is a different cache file.
    other = PipelineSpec("retinaface", None, "mobilefacenet", None, min_score=0.9)
    assert other.cache_id() != spec.cache_id()
    assert FeatureCache(tmp_path, other).lookup(keys)[1] == keys


def test_padding_keeps_coordinates_and_aligned_mode_realigns_a_crop(retinaface):
    images = [read_image(p) for p in _cfp_images(2)]
    _, status, faces = align_batch(images, retinaface)
    _, status_pad, faces_pad = align_batch(images, retinaface, pad=0.25)
    assert (status == STATUS_DETECTED).all() and (status_pad == STATUS_DETECTED).all()
    # Same landmarks (up to the network's response to the new context), in the unpadded image's coordinates.
    widths = faces[:, 2] - faces[:, 0]
    assert (np.abs(faces[:, 5:] - faces_pad[:, 5:]).max(axis=1) < 0.05 * widths).all()
    crop = read_image(shared_path("images", "group", "Tom_Hanks_54745.png"))
    realigned, status, faces = align_batch([crop], retinaface, mode="aligned", pad=0.5)
    assert status[0] == STATUS_DETECTED
    # The crop was already aligned: its landmarks sit near the ArcFace template and re-alignment barely moves it.
    from facepipe.alignment import ARCFACE_TEMPLATE_112

    assert np.abs(faces[0, 5:].reshape(5, 2) - ARCFACE_TEMPLATE_112).max() < 6.0
    assert np.abs(realigned[0].astype(int) - crop.astype(int)).mean() < 25
    blank = np.zeros((112, 112, 3), np.uint8)
    fallback, status, faces = align_batch([blank], retinaface, mode="aligned", pad=0.5)
    assert status[0] == STATUS_FALLBACK and np.isnan(faces[0]).all()
    np.testing.assert_array_equal(fallback[0], blank)
