"""MTCNN ``workers``: the images of one call on several threads give exactly the one-thread results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facepipe.detection.mtcnn import create_mtcnn
from tests.conftest import shared_path

cv2 = pytest.importorskip("cv2")

IMAGES = [
    "images/group/t1.jpg",
    "images/celebrities/Elon_Musk.jpg",
    "images/celebrities/002_331d0423.jpg",
    "images/celebrities/012_d461a2b5.jpg",
    "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg",
]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    loaded = [cv2.imread(str(shared_path(*key.split("/"))), cv2.IMREAD_COLOR) for key in IMAGES]
    assert all(image is not None for image in loaded)
    # Two of the same size, so one chunk holds two images and the chunks differ in size.
    return loaded + [cv2.flip(loaded[1], 1)]


def test_threads_give_the_single_thread_results_image_for_image(images):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = create_mtcnn(order="area", workers=1).detect_arrays(images)
        torch.set_num_threads(2)  # the pool must not inherit this: each worker runs one intra-op thread
        pooled = create_mtcnn(order="area", workers=3, batch_size=2).detect_arrays(images)
        assert torch.get_num_threads() == 2  # the caller's setting is left alone
    finally:
        torch.set_num_threads(threads)
    assert sum(len(probs) for _, probs, _ in alone) >= 10
    for one, many in zip(alone, pooled):
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)


def test_one_image_spread_over_its_pyramid_levels_gives_the_single_thread_results(images):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for image in images[:2]:
            alone = create_mtcnn(order="area", workers=1).detect_arrays([image])[0]
            spread = create_mtcnn(order="area", workers=2).detect_arrays([image])[0]
            assert len(alone[1]) >= 1
            for a, b in zip(alone, spread):
                np.testing.assert_array_equal(a, b)
    finally:
        torch.set_num_threads(threads)


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers"):
        create_mtcnn(workers=0)
