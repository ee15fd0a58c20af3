import numpy as np
import pytest

from facepipe.train.augment import (
    CROP_SCALES,
    FaceTargets,
    TrainAugment,
    mirror,
    pad_to_square,
    photometric_distort,
    random_square_crop,
    to_network_input,
)


def _image(height=200, width=300, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _face(x1, y1, x2, y2, with_landmarks=True) -> FaceTargets:
    w, h = x2 - x1, y2 - y1
    points = np.array(
        [[x1 + 0.3 * w, y1 + 0.4 * h], [x1 + 0.7 * w, y1 + 0.4 * h], [x1 + 0.5 * w, y1 + 0.6 * h],
         [x1 + 0.35 * w, y1 + 0.8 * h], [x1 + 0.65 * w, y1 + 0.8 * h]]
    )
    return FaceTargets([[x1, y1, x2, y2]], points[None], [with_landmarks])


def _concat(*faces: FaceTargets) -> FaceTargets:
    return FaceTargets(
        np.concatenate([f.boxes for f in faces]),
        np.concatenate([f.landmarks for f in faces]),
        np.concatenate([f.has_landmarks for f in faces]),
    )


def test_mirror_swaps_left_and_right_landmarks_and_moves_boxes():
    image = _image()
    faces = _face(40, 50, 100, 130)
    flipped_image, flipped = mirror(image, faces)
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_allclose(flipped.boxes, [[200, 50, 260, 130]])
    # the image-left eye of the mirrored face is the mirrored image-right eye, etc.
    expected = faces.landmarks[0][[1, 0, 2, 4, 3]].copy()
    expected[:, 0] = 300 - expected[:, 0]
    np.testing.assert_allclose(flipped.landmarks[0], expected)
    assert flipped.landmarks[0, 0, 0] < flipped.landmarks[0, 1, 0]  # left eye still left of right eye
    assert flipped.landmarks[0, 3, 0] < flipped.landmarks[0, 4, 0]
    back_image, back = mirror(flipped_image, flipped)
    np.testing.assert_array_equal(back_image, image)
    np.testing.assert_allclose(back.boxes, faces.boxes)
    np.testing.assert_allclose(back.landmarks, faces.landmarks)


def test_crops_are_square_of_a_reference_scale_with_faces_inside():
    image = _image(400, 600)
    faces = _concat(_face(10, 10, 60, 60), _face(250, 150, 300, 210), _face(540, 340, 598, 398, with_landmarks=False))
    rng = np.random.default_rng(0)
    for _ in range(60):
        crop, kept, cropped = random_square_crop(image, faces, rng)
        assert cropped
        side = crop.shape[0]
        assert crop.shape[:2] == (side, side)
        assert any(side == int(s * 400) for s in CROP_SCALES)
        assert len(kept) >= 1
        assert (kept.boxes >= 0).all() and (kept.boxes <= side).all()
        assert ((kept.boxes[:, 2:] - kept.boxes[:, :2]) > 0).all()
        assert (kept.landmarks[kept.has_landmarks] >= 0).all() and (kept.landmarks <= side).all()


def test_crop_keeps_exactly_the_faces_whose_centre_is_inside():
    """Re-derive the kept set from the crop offset (found by matching pixels) for a few seeds."""
    image = _image(300, 500, seed=5)
    faces = _concat(_face(20, 20, 80, 90), _face(200, 100, 260, 170), _face(420, 200, 480, 280))
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    for seed in range(8):
        crop, kept, _ = random_square_crop(image, faces, np.random.default_rng(seed))
        side = crop.shape[0]
        hits = [(x, y) for y in range(300 - side + 1) for x in range(500 - side + 1)
                if np.array_equal(image[y, x:x + 4], crop[0, :4]) and np.array_equal(image[y:y + side, x:x + side], crop)]
        assert len(hits) == 1
        x, y = hits[0]
        inside = ((centres > [x, y]) & (centres < [x + side, y + side])).all(axis=1)
        assert len(kept) == int(inside.sum())
        expected = np.clip(faces.boxes[inside] - [x, y, x, y], 0, side)
        np.testing.assert_allclose(kept.boxes, expected)
        wholly_inside = ((faces.boxes[:, :2] >= [x, y]) & (faces.boxes[:, 2:] <= [x + side, y + side])).all(axis=1)
        assert wholly_inside.any()


def test_crop_gives_up_and_returns_input_when_no_face_fits():
    image = _image(100, 400)
    faces = _face(0, 0, 400, 100)  # wider than any square crop
    crop, kept, cropped = random_square_crop(image, faces, np.random.default_rng(0), tries=20)
    assert not cropped and crop is image and kept is faces
    padded = pad_to_square(crop)
    assert padded.shape == (400, 400, 3)
    np.testing.assert_array_equal(padded[100:, :, 0], 104)
    np.testing.assert_array_equal(to_network_input(padded)[:, 100:, :], 0.0)  # padding is zero after the mean


def test_augmentation_is_deterministic_with_a_seed():
    image = _image(240, 320)
    faces = _concat(_face(30, 40, 90, 110), _face(200, 60, 250, 120, with_landmarks=False))
    augment = TrainAugment(image_size=128)
    a = augment(image, faces.copy(), np.random.default_rng([7, 0, 3]))
    b = augment(image, faces.copy(), np.random.default_rng([7, 0, 3]))
    c = augment(image, faces.copy(), np.random.default_rng([7, 1, 3]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    tensor, rows = a
    assert tensor.shape == (3, 128, 128) and tensor.dtype == np.float32
    assert rows.shape[1] == 15 and set(np.unique(rows[:, 14])) <= {1.0, -1.0}
    assert (rows[:, :4] >= 0).all() and (rows[:, :4] <= 1).all()
    assert (rows[rows[:, 14] < 0, 4:14] == 0).all()


def test_photometric_distort_keeps_dtype_shape_and_changes_pixels():
    image = _image(64, 64)
    outputs = [photometric_distort(image, np.random.default_rng(seed)) for seed in range(6)]
    assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outputs)
    assert sum(not np.array_equal(o, image) for o in outputs) >= 4


def test_face_targets_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="same number of faces"):
        FaceTargets(np.zeros((2, 4)), np.zeros((1, 5, 2)), np.zeros(2, bool))
