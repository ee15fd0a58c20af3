"""SCRFD batches split over single-thread onnxruntime sessions give the one-session numbers to the bit."""

from __future__ import annotations

import cv2
import numpy as np

from facepipe.detection.scrfd import ScrfdDetector, ScrfdOnnxBackend, ScrfdSettings
from tests.conftest import shared_path
from tests.detection.test_scrfd import ODD_HEIGHT, read, tiny_scrfd


def test_a_batch_over_parallel_sessions_equals_one_session_one_image_at_a_time():
    weights = str(shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx"))
    t1, group = read("images/group/t1.jpg"), read(ODD_HEIGHT)
    images = [t1, group, cv2.resize(group, (321, 200)), t1[:300]]
    alone = ScrfdDetector(ScrfdOnnxBackend(weights, intra_op_threads=1))
    parallel_backend = ScrfdOnnxBackend(weights, intra_op_threads=3)
    parallel = ScrfdDetector(parallel_backend, ScrfdSettings(batch_size=4))

    batch = alone.preprocess(images)
    for ours, theirs in zip(parallel_backend(batch[:1]), alone.backend(batch[:1])):  # one image: the 3-thread session
        np.testing.assert_array_equal(ours, theirs)
    assert not parallel_backend._workers
    together = parallel_backend(batch)
    assert len(parallel_backend._workers) == 3  # four images over three single-thread sessions
    for j in range(len(images)):
        for ours, theirs in zip(together, alone.backend(batch[j : j + 1])):
            np.testing.assert_array_equal(ours[j], theirs[0])
    expected = [alone.detect_rows([image])[0] for image in images]
    assert sum(len(rows) for rows in expected) > 10
    for ours, theirs in zip(parallel.detect_rows(images), expected):
        np.testing.assert_array_equal(ours, theirs)


def test_graphs_run_one_image_at_a_time_are_split_too():
    data = tiny_scrfd(9, batched=False, seed=5, head_perm=[3, 2, 0, 1]).SerializeToString()  # a head not rewritten
    backend = ScrfdOnnxBackend(data, intra_op_threads=2)
    assert not backend.batched
    probe = np.random.default_rng(3).uniform(-1, 1, (3, 3, 64, 96)).astype(np.float32)
    together = backend(probe)
    assert len(backend._workers) == 2
    alone = ScrfdOnnxBackend(data, intra_op_threads=1)
    for j in range(len(probe)):
        for ours, theirs in zip(together, alone(probe[j : j + 1])):
            np.testing.assert_array_equal(ours[j], theirs[0])
