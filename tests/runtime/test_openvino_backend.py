"""OpenVinoSession answers to the ONNX output names, whatever name OpenVINO gives each output tensor."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import shared_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")


def test_scrfd_outputs_by_their_onnx_names_equal_onnxruntime_in_fp32():
    # In scrfd_2.5g_bnkps.onnx three score outputs are Identity aliases: OpenVINO names those tensors by the
    # Identity's input (e.g. "445") and keeps the graph's name ("446") only among the tensor's other names.
    import onnxruntime as ort

    from facepipe.runtime.openvino_backend import OpenVinoSession

    model = shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx").read_bytes()
    reference = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [output.name for output in reference.get_outputs()]
    input_name = reference.get_inputs()[0].name
    batch = np.random.default_rng(0).uniform(-1, 1, (1, 3, 640, 640)).astype(np.float32)
    session = OpenVinoSession(model, "fp32", threads=1)
    ours = session.run(names, {input_name: batch})
    expected = reference.run(names, {input_name: batch})
    assert [a.shape for a in ours] == [b.shape for b in expected]
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    again = session.run(None, {input_name: batch * 0.5})  # the next call does not overwrite the returned arrays
    assert not np.array_equal(again[0], ours[0])
    np.testing.assert_allclose(session.run(names, {input_name: batch})[0], ours[0], rtol=0, atol=0)
