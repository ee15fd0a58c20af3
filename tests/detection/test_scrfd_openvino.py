"""SCRFD on OpenVINO fp32 (``runtime="openvino"``): within the insightface goldens' tolerance, batches as images."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.detection.scrfd import create_scrfd
from tests.conftest import shared_path
from tests.detection.test_scrfd import assert_golden_parity, read, representative_keys

pytest.importorskip("openvino")

WEIGHTS = str(shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx"))


@pytest.fixture(scope="module")
def detector():
    return create_scrfd(WEIGHTS, runtime="openvino", intra_op_threads=2, batch_size=8)


def test_openvino_parity_with_insightface_at_the_faceanalysis_default(detector):
    # Only at 0.5: at WIDER's 0.02 thousands of candidates per image tie within OpenVINO's ~1e-7 score
    # difference, so their order (and then NMS's choice) can differ from insightface's (5 of 41 images measured).
    golden = np.load(shared_path("golden", "scrfd_2.5g_shared_t050.npz"))
    assert detector.backend.name == "openvino-cpu"
    assert_golden_parity(detector, golden, representative_keys(golden, step=14))


def test_openvino_batch_over_streams_equals_single_images(detector):
    images = [read("images/group/t1.jpg"), read("images/celebrities/Elon_Musk.jpg"), read("images/group/t1.jpg")[:250]]
    batched = detector.detect_rows(images)
    for image, rows in zip(images, batched):
        np.testing.assert_allclose(rows, detector.detect_rows([image])[0], rtol=0, atol=1e-4)
    assert len(batched[0]) == 6


def test_runtime_option_is_checked():
    with pytest.raises(ValueError, match="runtime must be 'onnxruntime' or 'openvino'"):
        create_scrfd(WEIGHTS, runtime="tensorrt")
    with pytest.raises(ValueError, match="runs on the CPU"):
        create_scrfd(WEIGHTS, runtime="openvino", device="cuda")


def test_bf16_finds_the_fp32_faces_and_int8_is_refused():
    from facepipe.runtime.cpu import PrecisionError, unsupported_reason

    if unsupported_reason("bf16") is not None:
        with pytest.raises(PrecisionError):
            create_scrfd(WEIGHTS, precision="bf16")
        assert create_scrfd(WEIGHTS, precision="auto").backend.name.startswith("onnxruntime")  # auto falls back
        return
    bf16 = create_scrfd(WEIGHTS, precision="bf16", intra_op_threads=1)
    assert bf16.backend.name == "openvino-cpu-bf16" and create_scrfd(WEIGHTS, precision="auto").backend.name == bf16.backend.name
    fp32 = create_scrfd(WEIGHTS)
    for key in ("images/group/t1.jpg", "images/celebrities/Elon_Musk.jpg"):
        image = read(key)
        expected, got = fp32.detect_rows([image])[0], bf16.detect_rows([image])[0]
        assert len(got) == len(expected) >= 1, key
        # bf16 keeps 8 mantissa bits: boxes move by a fraction of a pixel, scores by ~1e-3 (AP in the precision report).
        np.testing.assert_allclose(got[:, :4], expected[:, :4], rtol=0, atol=2.0)
        np.testing.assert_allclose(got[:, 4], expected[:, 4], rtol=0, atol=0.02)
    with pytest.raises(PrecisionError, match="int8 is for embedders"):
        create_scrfd(WEIGHTS, precision="int8")
