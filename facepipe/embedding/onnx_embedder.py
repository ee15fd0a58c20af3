"""Face embedders from ONNX files run by onnxruntime (insightface ``w600k_r50.onnx``, ``glintr100.onnx``, ...).

The preprocessing contract is read from the model where it can be:

* input name, layout (NCHW or NHWC) and size from the graph input;
* normalisation by insightface's ArcFaceONNX rule, applied to the graph itself rather than to node names: a
  model whose input flows through ``Sub`` and ``Mul``/``Div`` before its first convolution (mxnet exports carry
  their normalisation inside) gets raw pixels (mean 0, std 1); any other gets mean = std = 127.5;
* colour order RGB (insightface feeds ``blobFromImage(..., swapRB=True)``).

Every part can be overridden (``input_format``, ``mean``, ``std``) for models that follow other conventions,
e.g. ``faceplugin_fr_feature_512d.onnx`` wants ``(x - 127) / 128``.

Models exported with a fixed batch of 1 are made batch-dynamic when that is provably safe (the rewritten
graph gives the same numbers as the original on a probe batch); otherwise crops are run one at a time.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from facepipe.embedding.base import PairEmbedding, embed_in_batches, preprocess
from facepipe.io.atomic import publish, temporary_path
from facepipe.models.registry import ModelConfig

INSIGHTFACE_MEAN = 127.5
INSIGHTFACE_STD = 127.5
# Conventions of known files that deviate from the insightface rule (``preset=`` option / ``--onnx-preset``).
PRESETS: dict[str, dict[str, Any]] = {
    # faceplugin-face-recognition-js: opencv.js RGBA canvas pixels, (x - 127) / 128
    "faceplugin": {"input_format": "RGB", "mean": 127.0, "std": 128.0},
    "insightface": {},
}


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("ONNX embedders need onnx and onnxruntime: pip install 'facepipe[onnx]'") from exc
    return onnx, onnxruntime


def graph_normalises_input(model: Any) -> bool:
    """True when the graph input reaches its first Conv through ``Sub`` then ``Mul``/``Div`` (mxnet export)."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if not inputs:
        return False
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    seen_ops: list[str] = []
    tensor = inputs[0]
    for _ in range(8):  # follow the single data path from the input until a convolution
        nodes = consumers.get(tensor, [])
        if len(nodes) != 1:
            break
        node = nodes[0]
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            break
        seen_ops.append(node.op_type)
        tensor = node.output[0]
    return "Sub" in seen_ops and ("Mul" in seen_ops or "Div" in seen_ops)


def _static_dims(value_info: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def make_batch_dynamic(model: Any) -> Any:
    """A copy of ``model`` whose first input/output dimension is symbolic and whose constant Reshape targets
    copy the batch dimension (``0``) instead of hard-coding ``1``."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    for value in list(graph.input) + list(graph.output):
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "batch"
    del graph.value_info[:]  # stale fixed-batch shapes would contradict the new input
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in initializers:
            init = initializers[node.input[1]]
            shape = numpy_helper.to_array(init).copy()
            if shape.ndim == 1 and len(shape) and shape[0] == 1:
                shape[0] = 0
                init.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), init.name))
    return model


class OnnxEmbedder(PairEmbedding):
    """``Embedder`` over an onnxruntime session."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        batch_size: int = 64,
        threads: int | None = None,
        input_format: str | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        precision: str = "fp32",
        calibrate: str | os.PathLike | None = None,
        model_name: str = "onnx",
    ) -> None:
        onnx, ort = _require_onnx()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        try:
            model = onnx.load(str(self.path))
        except Exception as exc:
            raise ValueError(f"cannot read ONNX model {self.path}: {exc}") from exc
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.providers = _providers(device, ort)
        self.options = ort.SessionOptions()
        if threads is not None:
            self.options.intra_op_num_threads = threads
            self.options.inter_op_num_threads = 1

        initializers = {init.name for init in model.graph.initializer}
        graph_inputs = [i for i in model.graph.input if i.name not in initializers]
        if len(graph_inputs) != 1:
            raise ValueError(f"{self.path.name}: expected one image input, found {[i.name for i in graph_inputs]}")
        self.input_name = graph_inputs[0].name
        dims = _static_dims(graph_inputs[0])
        if len(dims) != 4 or 3 not in (dims[1], dims[3]):
            raise ValueError(f"{self.path.name}: input {self.input_name} of shape {dims} is not an image batch")
        self.channels_last = dims[1] != 3
        height, width = (dims[1], dims[2]) if self.channels_last else (dims[2], dims[3])
        input_size = (height or 112, width or 112)
        output_dims = _static_dims(model.graph.output[0])
        embedding_size = output_dims[-1] if output_dims and output_dims[-1] else None

        in_graph = graph_normalises_input(model)
        default_mean, default_std = (0.0, 1.0) if in_graph else (INSIGHTFACE_MEAN, INSIGHTFACE_STD)
        self.normalisation_in_graph = in_graph
        self.config = ModelConfig(
            name=f"onnx:{self.path.stem}",
            kind="embedder",
            input_format=(input_format or "RGB").upper(),  # type: ignore[arg-type]
            mean=_triple(default_mean if mean is None else mean),
            std=_triple(default_std if std is None else std),
            input_size=input_size,
            embedding_size=embedding_size,
            description=f"{self.path.name} via onnxruntime",
        )
        if self.config.input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be RGB or BGR, got {input_format!r}")

        self.fixed_batch = dims[0] if dims[0] else None
        self.model_bytes = model.SerializeToString()
        self.session = ort.InferenceSession(self.model_bytes, self.options, providers=self.providers)
        if self.fixed_batch == 1:
            self._try_dynamic_batch(model, ort)
        self.precision = "fp32"
        if precision != "fp32" or calibrate is not None:
            self._use_precision(precision, calibrate, model_name, threads, device)
        if self.config.embedding_size is None:
            probe = self._run(np.zeros((1, 3, *input_size), dtype=np.float32))
            self.config = replace(self.config, embedding_size=int(probe.shape[-1]))
        self.name = self.config.name
        self.embedding_size = int(self.config.embedding_size)

    def _try_dynamic_batch(self, model: Any, ort: Any) -> None:
        """Swap in a batch-dynamic session if it reproduces the fixed-batch outputs on a random probe."""
        rng = np.random.default_rng(0)
        h, w = self.config.input_size  # type: ignore[misc]
        probe = rng.standard_normal((3, 3, h, w)).astype(np.float32)
        single = np.concatenate([self._run_session(self.session, probe[i : i + 1]) for i in range(3)])
        try:
            dynamic_bytes = make_batch_dynamic(model).SerializeToString()
            dynamic = ort.InferenceSession(dynamic_bytes, self.options, providers=self.providers)
            batched = self._run_session(dynamic, probe)
        except Exception:  # the graph hard-codes its batch somewhere we cannot rewrite: keep batch 1
            return
        if batched.shape == single.shape and np.allclose(batched, single, rtol=1e-4, atol=1e-4 * np.abs(single).max()):
            self.session = dynamic
            self.model_bytes = dynamic_bytes
            self.fixed_batch = None

    def _use_precision(self, precision: str, calibrate: str | os.PathLike | None, model_name: str, threads: int | None, device: str) -> None:
        """Swap the fp32 session for a bf16 / int8 one of the same graph (facepipe.runtime; fp32 keeps it)."""
        from facepipe.runtime.sessions import reduced_precision_session

        def calibration_batch(crops: np.ndarray) -> np.ndarray:
            x = preprocess(crops, self.config)
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if self.channels_last else x

        session, self.precision = reduced_precision_session(
            self.model_bytes, precision, model_name, threads, device, kind="embedder", input_name=self.input_name,
            input_size=self.config.input_size, preprocess=calibration_batch, calibrate=calibrate,
        )
        if session is not None:
            self.session = session

    def _run_session(self, session: Any, x: np.ndarray) -> np.ndarray:
        if self.channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return np.asarray(session.run(None, {self.input_name: x})[0], dtype=np.float32).reshape(len(x), -1)

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.fixed_batch is not None:
            return np.concatenate([self._run_session(self.session, x[i : i + 1]) for i in range(len(x))])
        return self._run_session(self.session, x)

    def embed(self, crops: np.ndarray, flip: bool = True) -> np.ndarray:
        return embed_in_batches(preprocess(crops, self.config), self._run, self.batch_size, self.embedding_size, flip)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"OnnxEmbedder({self.path.name}, {c.input_format}, mean={c.mean[0]:g}, std={c.std[0]:g}, size={c.input_size}, "
            f"precision={self.precision})"
        )


def _triple(value: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"expected one value or three (per channel), got {values}")
    return values  # type: ignore[return-value]


def _providers(device: str, ort: Any) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu, or use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r}: use cpu or cuda")


def create_onnx_embedder(
    weights: str | os.PathLike | None = None, device: str = "cpu", preset: str | None = None, **options: Any
) -> OnnxEmbedder:
    """``weights`` is the ``.onnx`` file; options: batch_size, threads, input_format, mean, std, precision
    (fp32 / bf16 / int8 / auto, ``facepipe.runtime.cpu``), calibrate (int8 crops folder), and ``preset`` (a key
    of ``PRESETS``) whose values explicit options override."""
    if weights is None:
        raise ValueError("the onnx embedder needs --weights FILE.onnx (e.g. w600k_r50.onnx, glintr100.onnx)")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown ONNX preset {preset!r}; known: {', '.join(PRESETS)}")
        options = {**PRESETS[preset], **{k: v for k, v in options.items() if v is not None}}
    return OnnxEmbedder(weights, device=device, **options)


class InGraphNormalisation(torch.nn.Module):
    """Wraps a network so that its exported graph starts with ``Sub`` and ``Mul`` (the mxnet-export layout)."""

    def __init__(self, inner: torch.nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", 1.0 / torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x - self.mean) * self.scale)


def export_onnx(
    model: torch.nn.Module,
    config: ModelConfig,
    path: str | os.PathLike,
    normalise_in_graph: bool = False,
    opset: int = 17,
) -> Path:
    """Export a facepipe torch embedder to ONNX with a dynamic batch axis, input named ``input.1``.

    ``normalise_in_graph=False`` gives the insightface convention (the runtime subtracts mean / divides std);
    ``True`` puts ``Sub`` and ``Mul`` in front of the network as mxnet exports do, so the file takes raw
    pixels in ``config.input_format`` order. The file is written atomically.
    """
    module = model.eval()
    if normalise_in_graph:
        module = InGraphNormalisation(module, config).eval()
    height, width = config.input_size or (112, 112)
    path = Path(path)
    partial = temporary_path(path)  # unique: processes may export the same file, each rename leaves a whole one
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation on every call
            torch.onnx.export(
                module,
                (torch.zeros(1, 3, height, width),),
                str(partial),
                input_names=["input.1"],
                output_names=["embedding"],
                dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=opset,
                dynamo=False,  # no onnxscript dependency; the graph is static apart from the batch axis
            )
        return publish(partial, path)
    finally:
        partial.unlink(missing_ok=True)
