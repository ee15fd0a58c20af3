"""MTCNN's packed P-Net pass: small pyramid levels side by side in one image score their cells as alone."""

import cv2
import numpy as np
import pytest
import torch

from facepipe.detection.mtcnn import (
    PACK_BELOW_PIXELS,
    IntegralImage,
    _packing,
    _PNetLevel,
    create_mtcnn,
    pyramid_scales,
    to_rgb,
)
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def detector():
    return create_mtcnn(order="area")


def test_packing_places_regions_on_even_offsets_without_overlap() -> None:
    sizes = ((101, 77), (72, 55), (51, 39), (36, 28), (26, 20), (18, 14), (13, 12))
    layout = _packing(sizes)
    taken = np.zeros((layout.height, layout.width), int)
    for (rows, cols), (top, left) in zip(sizes, layout.offsets):
        assert top % 2 == 0 and left % 2 == 0
        taken[top:top + rows, left:left + cols] += 1
    assert taken.max() == 1  # inside the image, no overlap
    assert taken.sum() / taken.size > 0.6  # the shelves waste little
    # The first convolution's output is unmasked exactly over each region's own (rows - 2) x (cols - 2) outputs.
    unmasked = ~layout.conv1_mask[0, 0].numpy()
    expected = np.zeros_like(unmasked)
    for (rows, cols), (top, left) in zip(sizes, layout.offsets):
        expected[top:top + rows - 2, left:left + cols - 2] = True
    np.testing.assert_array_equal(unmasked, expected)


def test_masked_pnet_scores_packed_inputs_as_alone(detector) -> None:
    rng = np.random.default_rng(0)
    sizes = ((31, 27), (22, 19), (16, 14))  # odd sizes: ceil-mode pooling windows at every right and bottom edge
    inputs = [rng.uniform(-1, 1, (rows, cols, 3)).astype(np.float32) for rows, cols in sizes]
    layout = _packing(sizes)
    canvas = np.full((1, layout.height, layout.width, 3), 5.0, np.float32)  # loud values between the regions
    for image, (top, left) in zip(inputs, layout.offsets):
        canvas[0, top:top + image.shape[0], left:left + image.shape[1]] = image

    def run(nhwc: np.ndarray, mask=None):
        with torch.inference_mode():
            offsets, probs = detector.pnet(torch.from_numpy(nhwc).permute(0, 3, 1, 2), mask)
        return offsets.numpy(), probs.numpy()

    offsets, probs = run(canvas, layout.conv1_mask)
    for image, (top, left) in zip(inputs, layout.offsets):
        alone_offsets, alone_probs = run(image[None])
        rows, cols = alone_probs.shape[1:]
        cells_rows, cells_cols = slice(top // 2, top // 2 + rows), slice(left // 2, left // 2 + cols)
        np.testing.assert_allclose(probs[:, cells_rows, cells_cols], alone_probs, rtol=0, atol=1e-6)
        np.testing.assert_allclose(offsets[:, :, cells_rows, cells_cols], alone_offsets, rtol=0, atol=1e-6)
    unmasked_probs = run(canvas)[1]  # without the mask the regions' edge cells see their neighbours
    assert not np.allclose(unmasked_probs, probs, atol=1e-6)


@pytest.mark.shared
def test_a_packed_pass_proposes_what_one_pass_per_level_does(detector) -> None:
    image = to_rgb(cv2.imread(str(shared_path("images", "group", "t1.jpg")), cv2.IMREAD_COLOR))
    integrals = [IntegralImage(image)]
    levels = [
        _PNetLevel.of(scale, image.shape[:2], None)
        for scale in pyramid_scales(*image.shape[:2], detector.min_face_size, detector.factor)
    ]
    small = [level for level in levels if level is not None and level.pixels < PACK_BELOW_PIXELS]
    assert len(small) >= 4
    threshold = np.float32(0.3)  # lower than P-Net's 0.6: more cells to compare
    packed = detector._pnet_pass(integrals, small, threshold)
    alone = [detector._pnet_pass(integrals, [level], threshold)[0] for level in small]
    assert sum(rows[0] is not None for rows in alone) >= 2
    for packed_rows, alone_rows in zip(packed, alone):
        if alone_rows[0] is None:
            assert packed_rows[0] is None
            continue
        assert packed_rows[0].shape == alone_rows[0].shape
        np.testing.assert_allclose(packed_rows[0], alone_rows[0], rtol=0, atol=1e-4)
