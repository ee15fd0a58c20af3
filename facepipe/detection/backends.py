"""Inference backends running a RetinaFace network on a float32 NCHW batch.

Every backend maps ``(N, 3, H, W)`` float32 (BGR minus the model mean) to numpy ``loc (N, P, 4)``,
``conf (N, P, 2)`` (softmax probabilities) and ``landms (N, P, 10)``.

* :class:`TorchBackend` -- the PyTorch model on CPU or CUDA (optionally fp16 autocast on CUDA). On CPU the
  BatchNorm layers are folded and the model runs channels-last, which is ~1.5x faster than eager NCHW.
* :class:`OnnxRuntimeBackend` -- an ONNX file or an in-memory export of our torch model. On this CPU
  onnxruntime runs this network faster than any torch eager configuration, so it is the default CPU
  backend of ``create_retinaface_mnet`` when onnxruntime is installed (see ``eval/bench_detection.py``).
"""

from __future__ import annotations

import io
import os
import warnings
from contextlib import nullcontext
from typing import Protocol

import numpy as np
import torch

from facepipe.models.checkpoint import CheckpointError, load_onnx_model_checked
from facepipe.models.retinaface import RetinaFace, fold_batchnorm

NetworkOutputs = tuple[np.ndarray, np.ndarray, np.ndarray]


class RetinaFaceBackend(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> NetworkOutputs: ...


class TorchBackend:
    """Runs ``model`` (folded in place when ``optimize``; pass a model you do not train any more)."""

    def __init__(self, model: RetinaFace, device: str = "cpu", fp16: bool = False, optimize: bool = True) -> None:
        self.device = torch.device(device)
        if fp16 and self.device.type != "cuda":
            raise ValueError("fp16 autocast is only supported on CUDA devices")
        model = model.eval().to(self.device)
        self.channels_last = optimize and self.device.type == "cpu"
        if optimize:
            fold_batchnorm(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.fp16 = fp16
        self.name = f"torch-{self.device.type}" + ("-fp16" if fp16 else "")

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray) -> NetworkOutputs:
        images = torch.from_numpy(batch).to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        context = torch.autocast("cuda", dtype=torch.float16) if self.fp16 else nullcontext()
        with context:
            loc, conf, landms = self.model(images)
        return tuple(t.float().cpu().numpy() for t in (loc, conf, landms))  # type: ignore[return-value]


def export_onnx(model: RetinaFace, path: str | os.PathLike | None = None, opset: int = 17) -> bytes:
    """Export ``model`` (BN folded first) to ONNX with dynamic batch/height/width; returns the bytes.

    When ``path`` is given the file is written atomically (temporary name, then renamed). Outputs are named
    ``loc``, ``conf`` (softmax) and ``landms``; the input ``input`` is float32 BGR minus the model mean.
    """
    model = fold_batchnorm(model.eval().cpu().to(memory_format=torch.contiguous_format))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (which needs onnxscript); it
        # still exports this static-graph network exactly, so its deprecation notices are silenced here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 64, 64),),
            buffer,
            input_names=["input"],
            output_names=["loc", "conf", "landms"],
            dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, **{
                name: {0: "batch", 1: "priors"} for name in ("loc", "conf", "landms")
            }},
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter needs no onnxscript and handles this net exactly
        )
    data = buffer.getvalue()
    if path is not None:
        from facepipe.io.atomic import atomic_write_bytes

        atomic_write_bytes(path, data)
    return data


def onnxruntime_session(
    model: str | os.PathLike | bytes, device: str = "cpu", intra_op_threads: int | None = None, config: dict[str, str] | None = None
):
    """An onnxruntime CPU (or CUDA) session for a file or serialized model, threads defaulting to torch's;
    ``config``: session config entries (``SessionOptions.add_session_config_entry``)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("the onnxruntime backend needs onnxruntime: pip install facepipe[onnx]") from exc
    if isinstance(model, (str, os.PathLike)):
        if not os.path.lexists(model):
            raise FileNotFoundError(f"ONNX model not found: {model}")
        model = load_onnx_model_checked(model).SerializeToString()  # garbage files: one CheckpointError line
    options = ort.SessionOptions()
    # Default to torch's thread setting so one knob (--threads / torch.set_num_threads) controls both.
    options.intra_op_num_threads = intra_op_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "device cuda requested but this onnxruntime has no CUDAExecutionProvider "
                "(install onnxruntime-gpu matching your CUDA, or use the torch backend)"
            )
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / NotImplemented on a model it cannot run
        text = str(exc).strip()
        raise CheckpointError(f"onnxruntime cannot load this model ({text.splitlines()[0] if text else exc!r})") from None


class OnnxRuntimeBackend:
    def __init__(
        self,
        model: str | os.PathLike | bytes,
        device: str = "cpu",
        intra_op_threads: int | None = None,
        precision: str = "fp32",
        model_name: str = "retinaface",
    ) -> None:
        if not isinstance(model, bytes):  # read and checked once, for onnxruntime and any reduced precision
            if not os.path.lexists(model):
                raise FileNotFoundError(f"ONNX model not found: {model}")
            model = load_onnx_model_checked(model).SerializeToString()
        self.session = onnxruntime_session(model, device, intra_op_threads)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(self.session.get_outputs()) != 3:
            raise ValueError("expected a RetinaFace ONNX graph with 1 input and 3 outputs (loc, conf, landmarks)")
        self.input_name = inputs[0].name
        self.name = "onnxruntime-" + ("cuda" if device.startswith("cuda") else "cpu")
        self.precision = "fp32"
        if precision != "fp32":  # bf16 on OpenVINO where the CPU has it (facepipe.runtime); same run() call
            from facepipe.runtime.sessions import reduced_precision_session

            threads = intra_op_threads or torch.get_num_threads()
            session, self.precision = reduced_precision_session(model, precision, model_name, threads, device, kind="detector")
            if session is not None:
                self.session = session
                self.name = f"openvino-cpu-{self.precision}"

    def __call__(self, batch: np.ndarray) -> NetworkOutputs:
        loc, conf, landms = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        if loc.shape[-1] != 4 or conf.shape[-1] != 2 or landms.shape[-1] != 10:
            raise ValueError(
                f"ONNX outputs have shapes {loc.shape}, {conf.shape}, {landms.shape}; expected RetinaFace "
                "(N, P, 4), (N, P, 2), (N, P, 10) in the order loc, conf, landmarks"
            )
        return loc, conf, landms
