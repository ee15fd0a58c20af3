"""MTCNN skips P-Net on the black border of padded images without changing a single output number."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.detection.mtcnn import IntegralImage, _pnet_region, create_mtcnn, pyramid_scales
from facepipe.io.images import read_image
from tests.conftest import shared_path

cv2 = pytest.importorskip("cv2")


def test_content_box_finds_the_non_black_span() -> None:
    image = np.zeros((40, 50, 3), np.uint8)
    image[7:20, 11:13, 2] = 1
    image[30, 45] = 255
    assert IntegralImage(image).content_box() == (7, 31, 11, 46)
    assert IntegralImage(np.zeros((5, 6, 3), np.uint8)).content_box() == (0, 0, 0, 0)


def test_pnet_region_covers_every_cell_that_sees_content_and_starts_on_the_cell_grid() -> None:
    height, width = 300, 260
    content = (75, 225, 65, 195)
    for scale in pyramid_scales(height, width, 20, 0.709):
        level = (int(height * scale + 1), int(width * scale + 1))
        (first_row, rows), (first_col, cols) = _pnet_region(content, (height, width), level)
        assert rows.start == 2 * first_row and cols.start == 2 * first_col
        # The cell before the first one sees only black level pixels (their windows end before the content).
        if first_row > 0:
            last_pixel = 2 * (first_row - 1) + 11
            assert (last_pixel + 1) * height / level[0] <= content[0]
    assert _pnet_region((0, 0, 0, 0), (10, 10), (8, 8)) is None
    assert _pnet_region(None, (10, 10), (8, 8)) == ((0, slice(None)), (0, slice(None)))


@pytest.mark.parametrize("name", ["022/frontal/01.jpg", "003/profile/02.jpg"])
def test_padded_images_give_identical_faces_with_and_without_the_skip(name: str) -> None:
    image = read_image(shared_path("cfp", "cfp-dataset", "Data", "Images", *name.split("/")))
    border = image.shape[0] // 2
    padded = cv2.copyMakeBorder(image, border, border, border, border, cv2.BORDER_CONSTANT, value=0)
    skipping = create_mtcnn()
    everything = create_mtcnn()
    everything._blank_probability = 1.0  # pretend a black cell could be a face: P-Net sees the whole image
    assert not skipping._blank_cell_passes() and everything._blank_cell_passes()
    got, want = skipping.detect([padded])[0], everything.detect([padded])[0]
    assert len(got) == len(want) >= 1
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.box, b.box)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
        assert a.score == b.score
