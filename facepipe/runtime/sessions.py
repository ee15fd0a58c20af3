"""The one place a requested precision becomes a session: fp32 keeps the caller's onnxruntime session.

Every ONNX-run model in facepipe (the exported torch embedders, ONNX embedders, RetinaFace on CPU) calls
``session.run(None, {input: batch})``; :func:`reduced_precision_session` returns an object with that call for
bf16 (OpenVINO) or int8 (onnxruntime on the calibrated QDQ copy), so the backends stay as they are.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from facepipe.runtime.cpu import Precision, PrecisionError, resolve_precision
from facepipe.runtime.quantize import has_calibration, int8_model


def reduced_precision_session(
    model: bytes,
    precision: str,
    model_name: str,
    threads: int | None,
    device: str = "cpu",
    kind: str = "embedder",
    input_name: str | None = None,
    input_size: tuple[int, int] | None = None,
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None,
    calibrate: str | os.PathLike | None = None,
) -> tuple[Any | None, Precision]:
    """``(session, precision)``: session None means "keep your fp32 session" (fp32 asked, or auto chose it).

    int8 is for embedders (``kind="embedder"``) and needs ``input_name``/``input_size``/``preprocess`` to
    calibrate; detectors get one clear line instead.
    """
    if kind != "embedder" and (precision or "").lower() == "int8":
        raise PrecisionError(f"precision int8 is for embedders; {model_name} runs fp32 or bf16 (its outputs move too much in int8)")
    calibrated = calibrate is not None or (kind == "embedder" and has_calibration(model))
    if calibrate is not None and (precision or "").lower() not in ("int8", "auto"):
        raise PrecisionError("calibrate is an int8 option: pass precision='int8' (or auto) with it")
    chosen = resolve_precision(precision, model_name, has_calibration=calibrated, device=device)
    if chosen == "fp32":
        return None, "fp32"
    if chosen == "bf16":
        from facepipe.runtime.openvino_backend import OpenVinoSession

        return OpenVinoSession(model, "bf16", threads), "bf16"
    if input_name is None or input_size is None or preprocess is None:
        raise ValueError("int8 calibration needs the input name, size and preprocessing")
    import onnxruntime as ort

    path = int8_model(model, input_name, input_size, preprocess, calibrate, label=model_name)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), "int8"
