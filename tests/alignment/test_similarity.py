import cv2
import numpy as np
import pytest

from facepipe.alignment import ARCFACE_TEMPLATE_112, align_faces, arcface_template, estimate_norm, norm_crop, umeyama_similarity
from facepipe.types import Face
from tests.conftest import shared_path


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, size=(8, 5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = src @ rotation.T + shift
    for s, d in zip(src, dst):
        matrix = umeyama_similarity(s, d)
        assert np.allclose(matrix[:, :2], rotation, atol=1e-10)
        assert np.allclose(matrix[:, 2], shift, atol=1e-9)


def test_batched_equals_one_by_one_and_matches_skimage():
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    landmarks = ARCFACE_TEMPLATE_112 * rng.uniform(0.5, 3, size=(16, 1, 1)) + rng.normal(0, 3, size=(16, 5, 2)) + 40
    batched = estimate_norm(landmarks)
    for lm, matrix in zip(landmarks, batched):
        assert np.array_equal(estimate_norm(lm), matrix)
        reference = SimilarityTransform.from_estimate(lm, ARCFACE_TEMPLATE_112).params[:2]
        assert np.allclose(matrix, reference, atol=1e-9)


def test_degenerate_landmarks_give_nan_matrix_and_black_crop():
    matrix = estimate_norm(np.full((5, 2), 7.0))
    assert np.isnan(matrix).all()
    crop = norm_crop(np.full((50, 50, 3), 200, np.uint8), np.full((5, 2), 7.0))
    assert crop.shape == (112, 112, 3) and crop.max() == 0


def test_templates_follow_insightface_offsets():
    assert np.allclose(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)
    expected_128 = ARCFACE_TEMPLATE_112.copy()
    expected_128[:, 0] += 8
    assert np.allclose(arcface_template(128), expected_128)
    expected_256 = ARCFACE_TEMPLATE_112 * 2
    expected_256[:, 0] += 16
    assert np.allclose(arcface_template(256), expected_256)
    assert np.allclose(arcface_template((112, 96)), ARCFACE_TEMPLATE_112 - [8, 0])
    with pytest.raises(ValueError):
        arcface_template(100)
    with pytest.raises(ValueError):
        estimate_norm(np.zeros((4, 2)))


def test_template_landmarks_align_to_themselves():
    image = np.random.default_rng(2).integers(0, 255, size=(112, 112, 3), dtype=np.uint8)
    crop = norm_crop(image, ARCFACE_TEMPLATE_112)
    assert np.abs(crop[2:-2, 2:-2].astype(int) - image[2:-2, 2:-2]).max() <= 1


def test_parity_with_insightface_norm_crop():
    golden = np.load(shared_path("golden", "norm_crop.npz"))
    matrices = estimate_norm(golden["landmarks"].astype(np.float64))
    assert np.abs(matrices - golden["M_from_float64_landmarks"]).max() < 1e-5
    assert np.abs(matrices - golden["M"]).max() < 1e-4
    for key, landmarks, expected in zip(golden["keys"], golden["landmarks"], golden["crops_bgr"]):
        image = cv2.imread(str(shared_path(str(key).split("#")[0])))
        crop = norm_crop(image, landmarks)
        assert np.abs(crop.astype(int) - expected).max() <= 1, key


def test_align_faces_batches_over_images():
    golden = np.load(shared_path("golden", "norm_crop.npz"))
    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")))
    rows = [i for i, k in enumerate(golden["keys"]) if str(k).startswith("images/group/t1.jpg#")]
    faces = [Face(box=[0, 0, 1, 1], score=1.0, landmarks=golden["landmarks"][i]) for i in rows]
    crops = align_faces([image, image[:10, :10]], [faces, []])
    assert crops[0].shape == (len(rows), 112, 112, 3) and crops[1].shape == (0, 112, 112, 3)
    assert np.abs(crops[0].astype(int) - golden["crops_bgr"][rows]).max() <= 1
