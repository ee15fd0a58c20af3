"""RetinaFace ``pad_multiple``: the padded input, the prior mask, and what padding does (and does not) change."""

import cv2
import numpy as np
import pytest

from facepipe.detection import create_detector
from facepipe.detection.priors import num_priors, prior_boxes, unpadded_priors
from facepipe.detection.retinaface import REDUCED_PRECISION_PAD_MULTIPLE, RetinaFaceSettings
from tests.conftest import shared_path


@pytest.mark.parametrize("size, padded", [((37, 53), (128, 128)), ((128, 256), (128, 256)), ((300, 641), (384, 768))])
def test_unpadded_priors_are_the_priors_of_the_unpadded_input(size, padded) -> None:
    (height, width), (padded_height, padded_width) = size, padded
    mask = unpadded_priors(height, width, padded_height, padded_width)
    assert mask.sum() == num_priors(height, width)
    in_pixels = prior_boxes(padded_height, padded_width)[mask] * np.float32([padded_width, padded_height] * 2)
    expected = prior_boxes(height, width) * np.float32([width, height] * 2)
    np.testing.assert_allclose(in_pixels, expected, rtol=0, atol=1e-3)


def test_a_padded_size_smaller_than_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="smaller"):
        unpadded_priors(100, 100, 96, 128)


def test_pad_multiple_must_be_positive() -> None:
    with pytest.raises(ValueError, match="pad_multiple"):
        RetinaFaceSettings(pad_multiple=0)


def test_padded_input_is_the_image_then_the_mean_colour() -> None:
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    exact = create_detector("retinaface", backend="torch")
    padded = create_detector("retinaface", backend="torch", pad_multiple=64)
    plain, batch = exact.preprocess([image]), padded.preprocess([image])
    assert plain.shape == (1, 3, 50, 70) and batch.shape == (1, 3, 64, 128)
    np.testing.assert_array_equal(batch[:, :, :50, :70], plain)
    assert not batch[:, :, 50:].any() and not batch[:, :, :, 70:].any()


@pytest.mark.shared
def test_padding_leaves_faces_away_from_the_bottom_and_right_edges_unchanged() -> None:
    exact = create_detector("retinaface", threshold=0.5)
    padded = create_detector("retinaface", threshold=0.5, pad_multiple=128)
    keys = ("images/group/t1.jpg", "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg")
    images = [cv2.imread(str(shared_path(*key.split("/"))), cv2.IMREAD_COLOR) for key in keys]
    assert all(image.shape[0] % 128 or image.shape[1] % 128 for image in images)  # padding really happens
    for image, faces, padded_faces in zip(images, exact.detect(images), padded.detect(images)):
        assert len(padded_faces) == len(faces) >= 6
        height, width = image.shape[:2]
        for face in faces:
            if min(height - face.box[3], width - face.box[2]) < 100:
                continue
            match = min(padded_faces, key=lambda other: np.abs(other.box - face.box).max())
            np.testing.assert_allclose(match.box, face.box, rtol=0, atol=0.01)
            np.testing.assert_allclose(match.landmarks, face.landmarks, rtol=0, atol=0.01)
            assert abs(match.score - face.score) < 1e-4


@pytest.mark.shared
def test_images_of_one_padded_shape_batch_like_one_at_a_time() -> None:
    detector = create_detector("retinaface", threshold=0.5, pad_multiple=128)
    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")), cv2.IMREAD_COLOR)
    images = [image, np.ascontiguousarray(image[:-30, :-50])]  # different sizes, one padded shape
    together = detector.detect(images)
    for single, batched in zip((detector.detect([im])[0] for im in images), together):
        assert len(single) == len(batched) >= 6
        for a, b in zip(single, batched):
            np.testing.assert_allclose(a.box, b.box, rtol=0, atol=1e-3)


def test_whole_dataset_runs_pad_reduced_precision_inputs() -> None:
    from facepipe.detection import pipeline_detector_options
    from facepipe.runtime.cpu import unsupported_reason

    assert pipeline_detector_options("retinaface", {"precision": "bf16"})["pad_reduced_precision"] is True
    assert create_detector("retinaface", pad_reduced_precision=True).settings.pad_multiple == 1  # fp32: never
    reason = unsupported_reason("bf16")
    if reason:
        pytest.skip(reason)
    padded = create_detector("retinaface", precision="bf16", pad_reduced_precision=True)
    assert padded.settings.pad_multiple == REDUCED_PRECISION_PAD_MULTIPLE
    assert create_detector("retinaface", precision="bf16").settings.pad_multiple == 1  # a lone detect() call
    told = create_detector("retinaface", precision="bf16", pad_reduced_precision=True, pad_multiple=32)
    assert told.settings.pad_multiple == 32
