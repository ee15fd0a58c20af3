"""An ONNX network compiled by OpenVINO for the CPU, in fp32 or bf16, behind onnxruntime's ``session.run`` call.

Why OpenVINO for bf16: onnxruntime's CPU provider has no bf16 convolutions, while OpenVINO runs the whole
graph in bf16 on AVX512-BF16 / AMX (keeping accumulation and the layers it judges sensitive in fp32). Measured
by ``eval/precision_report.py`` (README "Reduced precision"): 2.1x onnxruntime fp32 on iresnet100, 2.2x on
MobileFaceNet, whose embeddings keep cosine >= 0.994 to fp32 on CFP crops.

The session keeps one infer request per instance (detectors and embedders are not shared across threads).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np


def _require_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise ImportError("precision bf16 runs on OpenVINO: pip install 'facepipe[openvino]'") from exc
    return openvino


class OpenVinoSession:
    """``run(output_names, {input_name: array}) -> [arrays]`` like ``onnxruntime.InferenceSession``.

    ``threads`` caps OpenVINO's CPU threads (default: all cores); no pinning, because the machines facepipe
    runs on are usually shared and a pinned thread waits for a busy core.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        precision: Literal["fp32", "bf16"] = "bf16",
        threads: int | None = None,
    ) -> None:
        ov = _require_openvino()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"OpenVINO runs fp32 or bf16 here, got {precision!r}")
        core = ov.Core()
        source = io.BytesIO(model) if isinstance(model, bytes) else str(Path(model))
        network = core.read_model(source)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(network, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self.precision = precision

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}; the model takes {self.input_names}")
        # share_inputs: the request reads the caller's array in place (infer is synchronous; a VGA RetinaFace input
        # is 3.7 MB). share_outputs, then one copy here: the request reuses its output buffers on the next call.
        feeds = {name: np.ascontiguousarray(value) for name, value in feeds.items()}
        results = self.request.infer(feeds, share_inputs=True, share_outputs=True)
        # An output tensor can have several names (OpenVINO may fold an Identity into it): answer to each.
        by_name = {name: value for port, value in results.items() for name in port.get_names()}
        return [np.array(by_name[name], dtype=np.float32) for name in (output_names or self.output_names)]
