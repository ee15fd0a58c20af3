"""SCRFD, insightface's face detector (``det_10g.onnx``, ``det_2.5g.onnx``, ``det_500m.onnx``, ``scrfd_*.onnx``).

Defaults reproduce insightface 0.7.3 ``FaceAnalysis`` (``model_zoo/scrfd.py``, ``SCRFD.detect``):

* **Letterbox**: keep the aspect ratio, ``cv2.resize`` (bilinear) so that the image fits ``det_size``
  (640x640; ``int()`` of the scaled side), paste it at the top-left of a black canvas of that size.
* **Input**: ``blobFromImage(canvas, 1/128, mean 127.5, swapRB)``, i.e. RGB ``(x - 127.5) / 128``.
* **Decode** per stride ``s``: anchor centres ``(col * s, row * s)`` (no +0.5), ``num_anchors`` consecutive
  predictions per location; distances and keypoint offsets are multiplied by ``s``; keep ``score >=
  threshold`` (0.5, ``det_thresh``); divide by the resize factor (``new_height / height``).
* **NMS**: rows sorted by score, greedy, IoU with +1 areas, keep when IoU <= 0.4 (:func:`box_ops.nms` is
  exactly this).

Only candidates above the threshold are decoded (the reference decodes every anchor, then selects):
element-wise float32 arithmetic, so the numbers are the same.

Graph layouts (insightface's rule: the number of outputs, ordered scores x levels, boxes x levels,
keypoints x levels): 6 = strides 8/16/32, 2 anchors, no keypoints; 9 = the same with keypoints; 10 = strides
8..128, 1 anchor, no keypoints; 15 = the same with keypoints. Graphs without keypoints give NaN landmarks.
Outputs may be ``(anchors, C)`` (exported at batch 1, e.g. ``scrfd_2.5g_bnkps.onnx`` and buffalo_s) or
``(N, anchors, C)``.

Batches: every letterboxed image has the ``det_size`` shape, so images of any sizes run as one batch. A graph
exported at batch 1 is rewritten so that its batch axis is dynamic (its head's ``Transpose``/``Reshape``
keep the batch axis instead of folding it into the anchors); the rewrite is used only when it gives the
original graph's outputs on a probe batch, otherwise images run one at a time.

Other options: any ``det_size`` (multiples of the largest stride); ``det_size="auto"`` runs 128x128 and
640x640 and merges the candidates of both before one NMS (insightface 1.0's automatic mode);
``scale="original"`` runs the image at its own size (bottom/right padded with black to a multiple of the
largest stride; WIDER-style testing).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import cv2
import numpy as np

from facepipe.detection.backends import onnxruntime_session
from facepipe.detection.base import check_images
from facepipe.detection.box_ops import nms
from facepipe.io.files import FileReadError, check_regular_file
from facepipe.runtime.cpu import PrecisionError, resolve_precision
from facepipe.types import Face

ScalePolicy = Literal["letterbox", "original"]

# insightface SCRFD.forward: blobFromImage(img, 1.0 / input_std, ..., (input_mean,) * 3, swapRB=True)
INPUT_MEAN = 127.5
INPUT_STD = 128.0
# What a black canvas pixel becomes (exact in float32).
BLACK = np.float32((0.0 - INPUT_MEAN) / INPUT_STD)
DEFAULT_DET_SIZE = (640, 640)  # (width, height), FaceAnalysis.prepare(det_size=(640, 640))
AUTO_DET_SIZES = ((128, 128), (640, 640))  # insightface 1.0 det_size="auto"


@dataclass(frozen=True)
class ScrfdLayout:
    """What a SCRFD graph's outputs mean."""

    strides: tuple[int, ...]
    num_anchors: int  # predictions per feature-map location
    keypoints: bool

    @property
    def levels(self) -> int:
        return len(self.strides)

    @property
    def max_stride(self) -> int:
        return max(self.strides)


# Number of outputs -> layout (insightface SCRFD._init_vars).
LAYOUTS: dict[int, ScrfdLayout] = {
    6: ScrfdLayout((8, 16, 32), 2, False),
    9: ScrfdLayout((8, 16, 32), 2, True),
    10: ScrfdLayout((8, 16, 32, 64, 128), 1, False),
    15: ScrfdLayout((8, 16, 32, 64, 128), 1, True),
}


def tensor_dims(value_info: Any) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def _shape_text(dims: list[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) or "scalar"


def graph_inputs(model: Any) -> list[Any]:
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def describe_graph(model: Any) -> str:
    """One line: the graph's inputs and outputs with their shapes (for error messages)."""
    inputs = ", ".join(f"{i.name} {_shape_text(tensor_dims(i))}" for i in graph_inputs(model))
    outputs = [_shape_text(tensor_dims(o)) for o in model.graph.output]
    shown = ", ".join(outputs[:6]) + (f", ... ({len(outputs)} in all)" if len(outputs) > 6 else "")
    return f"input {inputs or 'none'}; {len(outputs)} output(s) {shown}"


def scrfd_layout(model: Any) -> ScrfdLayout:
    """The layout of a SCRFD graph, or ``ValueError`` saying what the graph is instead."""
    inputs = graph_inputs(model)
    outputs = list(model.graph.output)
    layout = LAYOUTS.get(len(outputs))
    problem = None
    if len(inputs) != 1 or len(tensor_dims(inputs[0])) != 4 or tensor_dims(inputs[0])[1] not in (3, None):
        problem = "expected one (N, 3, H, W) image input"
    elif layout is None:
        problem = "expected 6, 9, 10 or 15 outputs (scores, boxes[, keypoints] per stride)"
    else:
        widths = [1] * layout.levels + [4] * layout.levels + ([10] * layout.levels if layout.keypoints else [])
        for output, width in zip(outputs, widths):
            dims = tensor_dims(output)
            if len(dims) not in (0, 2, 3) or (dims and dims[-1] not in (width, None)):
                problem = f"output {output.name} should be (anchors, {width}) or (N, anchors, {width})"
                break
    if problem is not None:
        raise ValueError(f"not a SCRFD graph: {problem}; found {describe_graph(model)}")
    return layout


def _constant_arrays(model: Any) -> dict[str, Any]:
    """Tensor name -> TensorProto of every initializer and Constant node value."""
    from onnx import helper

    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = helper.get_attribute_value(attribute)
    return constants


def make_batch_dynamic(model: Any) -> Any:
    """A copy of a batch-1 SCRFD graph whose outputs keep a batch axis: ``(N, anchors, C)``.

    On top of the embedders' rewrite (:func:`facepipe.embedding.onnx_embedder.make_batch_dynamic`: symbolic
    batch dimension, ``Reshape([1, ...])`` -> ``[0, ...]``), the heads of insightface's exports, which end in
    ``Transpose(perm=[2, 3, 0, 1])`` (N, C, H, W -> H, W, N, C) and ``Reshape([-1, C])`` and so fold the batch
    into the anchors, become ``Transpose([0, 2, 3, 1])`` and ``Reshape([0, -1, C])``: per image, the same
    anchor order as before. ``ValueError`` when a head looks like neither.
    """
    from onnx import numpy_helper

    from facepipe.embedding.onnx_embedder import make_batch_dynamic as symbolic_batch

    model = symbolic_batch(model)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    constants = _constant_arrays(model)
    for index, output in enumerate(graph.output):
        node = producers.get(output.name)
        while node is not None and node.op_type in ("Sigmoid", "Identity", "Mul", "Cast"):
            node = producers.get(node.input[0])
        if node is None or node.op_type != "Reshape" or node.input[1] not in constants:
            raise ValueError(f"output {output.name} is not produced by a constant Reshape")
        target = numpy_helper.to_array(constants[node.input[1]]).astype(np.int64).tolist()
        if len(target) == 3 and target[0] == 0:  # (N, anchors, C) already
            continue
        if len(target) != 2 or target[0] != -1:
            raise ValueError(f"output {output.name}: unexpected Reshape target {target}")
        transpose = producers.get(node.input[0])
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"] if transpose is not None else []
        if transpose is None or transpose.op_type != "Transpose" or perm != [[2, 3, 0, 1]]:
            raise ValueError(f"output {output.name}: its Reshape does not follow a Transpose [2, 3, 0, 1]")
        for attribute in transpose.attribute:
            if attribute.name == "perm":
                del attribute.ints[:]
                attribute.ints.extend([0, 2, 3, 1])
        name = f"scrfd_batched_shape_{index}"
        graph.initializer.append(numpy_helper.from_array(np.array([0, -1, target[1]], dtype=np.int64), name))
        node.input[1] = name
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "batch"
        dims.add().dim_param = "anchors"
        dims.add().dim_value = target[1]
    used = {name for node in graph.node for name in node.input}
    declared = {value.name for value in graph.input}
    stale = [init for init in graph.initializer if init.name not in used and init.name not in declared]
    for init in stale:  # the replaced shape constants (onnxruntime warns about unused initializers)
        graph.initializer.remove(init)
    return model


class ScrfdBackend(Protocol):
    """Runs a SCRFD graph: ``(N, 3, H, W)`` float32 -> its outputs, each ``(N, anchors, C)``."""

    name: str
    layout: ScrfdLayout
    input_size: tuple[int, int] | None  # (width, height) when the graph fixes it

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]: ...


# Worker threads that sleep instead of spinning between layers, and work handed out in smaller blocks: on a
# shared machine a spinning or straggling thread stalls every layer (measured on 2 busy cores, 2 threads: 1.3-1.5x
# faster; outputs equal to the bit). Single-thread sessions have no worker threads.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "session.dynamic_block_base": "4"}


class ScrfdOnnxBackend:
    """onnxruntime session of a SCRFD ONNX graph (checked on load; batch-1 exports made batch-dynamic).

    On the CPU, a batch of several images is split over ``intra_op_threads`` single-thread sessions run side
    by side (onnxruntime releases the GIL) instead of one multi-thread session: images are independent, so
    each core works without waiting for the others at every layer, and the outputs are the same to the bit
    (onnxruntime's CPU kernels give equal numbers at any thread count and batch size; checked by the tests).
    Measured in ``eval/bench_detection.py`` (README "What was measured"). Single images use the multi-thread session.
    """

    def __init__(self, model: str | os.PathLike | bytes, device: str = "cpu", intra_op_threads: int | None = None) -> None:
        import onnx
        import torch

        label = "model" if isinstance(model, bytes) else Path(model).name
        if isinstance(model, (str, os.PathLike)):
            if not os.path.lexists(model):
                raise FileNotFoundError(f"ONNX model not found: {model}")
            try:
                check_regular_file(model)  # a FIFO or folder: its own reason, never a hang
            except FileReadError as exc:
                raise ValueError(f"{label}: cannot read it ({exc})") from None
        try:
            proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not an ONNX file"
            raise ValueError(f"{label}: cannot read it as ONNX ({type(exc).__name__})") from None
        try:
            self.layout = scrfd_layout(proto)
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None
        self._device = device
        self.threads = max(1, intra_op_threads or torch.get_num_threads())
        dims = tensor_dims(graph_inputs(proto)[0])
        self.input_name = graph_inputs(proto)[0].name
        self.input_size = (dims[3], dims[2]) if dims[2] and dims[3] else None
        self.graph = proto.SerializeToString()  # what the session runs (after a batch-axis rewrite, that graph)
        self.session = onnxruntime_session(self.graph, device, self.threads, SESSION_CONFIG)
        self.output_names = [o.name for o in self.session.get_outputs()]
        # Batch-1 exports fold the batch into the anchors of 2-D outputs: only 3-D outputs on a batch-dynamic
        # input are batched as they are.
        self.batched = dims[0] != 1 and all(len(tensor_dims(o)) == 3 for o in proto.graph.output)
        if not self.batched:
            self._try_dynamic_batch(proto)
        self._workers: list[Any] = []  # the single-thread sessions, made on the first batch that uses them
        self.name = "onnxruntime-" + ("cuda" if device.startswith("cuda") else "cpu")

    def _probe(self, count: int) -> np.ndarray:
        width, height = self.input_size or (2 * self.layout.max_stride, self.layout.max_stride)
        rng = np.random.default_rng(0)
        return rng.uniform(-1.0, 1.0, (count, 3, height, width)).astype(np.float32)

    def _run_single(self, session: Any, batch: np.ndarray) -> list[np.ndarray]:
        outs = [session.run(self.output_names, {self.input_name: batch[i : i + 1]}) for i in range(len(batch))]
        return [np.stack([out[k].reshape(-1, out[k].shape[-1]) for out in outs]) for k in range(len(self.output_names))]

    def _try_dynamic_batch(self, proto: Any) -> None:
        """Use a batch-dynamic rewrite of the graph when it reproduces the batch-1 outputs on a probe."""
        probe = self._probe(3)
        single = self._run_single(self.session, probe)
        try:
            graph = make_batch_dynamic(proto).SerializeToString()
            dynamic = onnxruntime_session(graph, self._device, self.threads, SESSION_CONFIG)
            batched = dynamic.run(self.output_names, {self.input_name: probe})
        except Exception:  # noqa: BLE001 - a head we cannot rewrite: run images one at a time
            return
        if all(b.shape == s.shape and np.allclose(b, s, rtol=1e-5, atol=1e-5) for b, s in zip(batched, single)):
            self.session, self.batched, self.graph = dynamic, True, graph

    def _run(self, session: Any, batch: np.ndarray) -> list[np.ndarray]:
        if not self.batched:
            return self._run_single(session, batch)
        outs = session.run(self.output_names, {self.input_name: batch})
        return [out.reshape(len(batch), -1, out.shape[-1]) for out in outs]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        parts = min(self.threads, len(batch))
        if parts < 2 or self._device != "cpu":
            return self._run(self.session, batch)
        while len(self._workers) < parts:
            self._workers.append(onnxruntime_session(self.graph, self._device, 1))
        # A pool per call: a pool kept on the backend would not survive a fork into worker processes.
        with ThreadPoolExecutor(parts) as pool:
            outputs = list(pool.map(self._run, self._workers[:parts], np.array_split(batch, parts)))
        return [np.concatenate([out[k] for out in outputs]) for k in range(len(self.output_names))]


class ScrfdOpenVinoBackend:
    """The checked graph of :class:`ScrfdOnnxBackend` compiled by OpenVINO for the CPU: fp32 (opt-in,
    ``runtime="openvino"``) or bf16 (``precision="bf16"``; its WIDER AP in ``eval/precision_report.py``).

    Why: OpenVINO's convolutions are faster than onnxruntime's on some CPUs and its threads degrade less on a
    busy machine (README "What was measured"). Its numbers are not onnxruntime's: scores differ by ~1e-7 and boxes
    by ~1e-4 px, inside the golden tolerance (0.01 px, 1e-5) but not bit-equal, so a score that lands on
    the threshold can fall on the other side; onnxruntime stays the default. Images run one at a time on a
    static shape (OpenVINO plans memory per shape): a single image on ``intra_op_threads`` threads, a batch
    over as many single-thread streams.
    """

    def __init__(
        self, model: str | os.PathLike | bytes, intra_op_threads: int | None = None, precision: str = "fp32"
    ) -> None:
        from facepipe.runtime.openvino_backend import _require_openvino

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"OpenVINO runs SCRFD in fp32 or bf16, got {precision!r}")
        self.precision = precision

        self._ov = _require_openvino()
        checked = ScrfdOnnxBackend(model, "cpu", intra_op_threads)  # parsed, checked, batch axis made dynamic
        self.layout, self.input_size, self.batched = checked.layout, checked.input_size, True
        self.output_names, self.threads = checked.output_names, checked.threads
        self._network = self._ov.Core().read_model(io.BytesIO(checked.graph))
        self._compiled: dict[tuple[int, int, bool], tuple[Any, list[Any]]] = {}  # -> (request queue, output ports)
        self.name = "openvino-cpu" + ("-bf16" if precision == "bf16" else "")

    def _model(self, height: int, width: int, streams: bool) -> Any:
        key = (height, width, streams)
        if key not in self._compiled:
            network = self._network.clone()
            network.reshape([1, 3, height, width])
            config = {
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                "PERFORMANCE_HINT": "THROUGHPUT" if streams else "LATENCY",
                "NUM_STREAMS": self.threads if streams else 1,
                "INFERENCE_NUM_THREADS": self.threads,
                "ENABLE_CPU_PINNING": False,  # shared machines: a pinned thread waits for a busy core
            }
            compiled = self._ov.Core().compile_model(network, "CPU", config)
            queue = self._ov.AsyncInferQueue(compiled, self.threads if streams else 1)
            self._compiled[key] = (queue, [compiled.output(name) for name in self.output_names])
        return self._compiled[key]

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        queue, ports = self._model(batch.shape[2], batch.shape[3], streams=self.threads > 1 and len(batch) > 1)
        results: list[list[np.ndarray]] = [[] for _ in batch]

        def keep(request: Any, index: int) -> None:  # copies: a request reuses its output buffers
            results[index] = [np.array(request.get_tensor(port).data, dtype=np.float32) for port in ports]

        queue.set_callback(keep)
        for index in range(len(batch)):
            queue.start_async({0: batch[index : index + 1]}, index)
        queue.wait_all()
        return [np.stack([out[k].reshape(-1, out[k].shape[-1]) for out in results]) for k in range(len(ports))]


@dataclass(frozen=True)
class ScrfdSettings:
    threshold: float = 0.5  # det_thresh: keep score >= threshold
    nms_threshold: float = 0.4
    det_size: Any = None  # (width, height), an int (square), "WxH", "auto"; None: the graph's size or 640x640
    scale: ScalePolicy = "letterbox"
    batch_size: int = 8

    def __post_init__(self) -> None:
        try:
            for name in ("threshold", "nms_threshold"):
                object.__setattr__(self, name, float(getattr(self, name)))
            object.__setattr__(self, "batch_size", int(self.batch_size))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid SCRFD setting: {exc}") from None
        object.__setattr__(self, "det_size", _parse_det_size(self.det_size))
        if self.scale not in ("letterbox", "original"):
            raise ValueError(f"scale must be 'letterbox' or 'original', got {self.scale!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in ("threshold", "nms_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def det_sizes(self) -> tuple[tuple[int, int], ...]:
        if self.det_size == "auto":
            return AUTO_DET_SIZES
        return (self.det_size or DEFAULT_DET_SIZE,)


def _parse_det_size(value: Any) -> tuple[int, int] | str | None:
    if value is None or value == "auto":
        return value
    try:
        if isinstance(value, str):
            parts = value.lower().replace(",", "x").split("x")
            size = tuple(int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
        elif isinstance(value, (int, np.integer)):
            size = (int(value), int(value))
        else:
            size = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 32 or any(v % 32 for v in size):
        raise ValueError(f"det_size must be 'auto' or (width, height) in multiples of 32, got {value!r}")
    return size  # type: ignore[return-value]


@dataclass(frozen=True)
class _Pass:
    """One image on one canvas: the resized image occupies the top-left ``height x width``."""

    image_index: int
    canvas: tuple[int, int]  # (height, width) network input
    height: int
    width: int
    factor: float  # det_scale: resized / original


def _letterbox(image_index: int, shape: tuple[int, ...], det_size: tuple[int, int]) -> _Pass:
    """insightface SCRFD.detect's resize rule (``int()`` of the scaled side)."""
    height, width = shape[:2]
    det_width, det_height = det_size
    if float(height) / width > float(det_height) / det_width:
        new_height = det_height
        new_width = max(1, int(new_height / (float(height) / width)))
    else:
        new_width = det_width
        new_height = max(1, int(new_width * (float(height) / width)))
    return _Pass(image_index, (det_height, det_width), new_height, new_width, float(new_height) / height)


class ScrfdDetector:
    """Implements :class:`facepipe.detection.base.Detector` on a :class:`ScrfdBackend`."""

    def __init__(self, backend: ScrfdBackend, settings: ScrfdSettings | None = None, name: str = "scrfd") -> None:
        self.backend = backend
        self.layout = backend.layout
        settings = settings or ScrfdSettings()
        if settings.det_size is None and backend.input_size is not None:
            settings = replace(settings, det_size=backend.input_size)
        if backend.input_size is not None and (settings.scale != "letterbox" or settings.det_sizes != (backend.input_size,)):
            raise ValueError(
                f"this graph takes only {backend.input_size[0]}x{backend.input_size[1]} inputs: "
                "use that det_size and scale=letterbox"
            )
        for width, height in settings.det_sizes:
            if width % self.layout.max_stride or height % self.layout.max_stride:
                raise ValueError(f"det_size {width}x{height} must be a multiple of this graph's stride {self.layout.max_stride}")
        self.settings = settings
        self.name = name

    def with_settings(self, **changes: Any) -> "ScrfdDetector":
        """A detector sharing this backend with some settings changed."""
        return ScrfdDetector(self.backend, replace(self.settings, **changes), self.name)

    # --- public API ------------------------------------------------------------------------------------
    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        check_images(images)
        return [[Face.from_row(r) for r in rows] for rows in self.detect_rows(images)]

    def detect_rows(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image a float32 ``(N, 15)`` array ``x1, y1, x2, y2, score, 5 x (x, y)``, NMS order."""
        passes = [p for index, image in enumerate(images) for p in self._plan(index, image.shape)]
        candidates: list[list[np.ndarray]] = [[] for _ in images]
        for p, rows in zip(passes, self._run_passes(images, passes)):
            candidates[p.image_index].append(rows)
        results = []
        for parts in candidates:
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
            # insightface: sort by score (argsort()[::-1]), then NMS on the sorted rows.
            rows = rows[rows[:, 4].argsort()[::-1]]
            results.append(rows[nms(rows, self.settings.nms_threshold)])
        return results

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Network input ``(N, 3, H, W)`` of the first planned pass of each image (they must share a canvas)."""
        passes = [self._plan(i, image.shape)[0] for i, image in enumerate(images)]
        if len({p.canvas for p in passes}) > 1:
            raise ValueError("preprocess needs images that share one network input shape")
        batch = np.empty((len(images), 3, *passes[0].canvas), dtype=np.float32)
        for j, p in enumerate(passes):
            self._prepare_into(images[j], p, batch[j])
        return batch

    # --- internals -------------------------------------------------------------------------------------
    def _plan(self, index: int, shape: tuple[int, ...]) -> list[_Pass]:
        if self.settings.scale == "original":
            height, width = shape[:2]
            step = self.layout.max_stride
            canvas = (-(-height // step) * step, -(-width // step) * step)
            return [_Pass(index, canvas, height, width, 1.0)]
        return [_letterbox(index, shape, size) for size in self.settings.det_sizes]

    @staticmethod
    def _prepare_into(image: np.ndarray, p: _Pass, out: np.ndarray) -> None:
        """RGB ``(x - 127.5) / 128`` of the pass's canvas into ``out (3, H, W)`` (= blobFromImage's numbers)."""
        resized = image
        if image.shape[:2] != (p.height, p.width):
            resized = cv2.resize(image, (p.width, p.height))  # bilinear, as the reference
        out[:, p.height :, :] = BLACK
        out[:, : p.height, p.width :] = BLACK
        for channel in range(3):  # BGR -> RGB; (x - 127.5) and the power-of-two division are exact in float32
            target = out[channel, : p.height, : p.width]
            np.subtract(resized[:, :, 2 - channel], np.float32(INPUT_MEAN), out=target, dtype=np.float32)
            target *= np.float32(1.0 / INPUT_STD)

    def _run_passes(self, images: Sequence[np.ndarray], passes: list[_Pass]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(passes)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(passes):
            groups.setdefault(p.canvas, []).append(i)
        for canvas, indices in groups.items():
            for start in range(0, len(indices), self.settings.batch_size):
                chunk = indices[start : start + self.settings.batch_size]
                batch = np.empty((len(chunk), 3, *canvas), dtype=np.float32)
                for j, i in enumerate(chunk):
                    self._prepare_into(images[passes[i].image_index], passes[i], batch[j])
                outputs = self.backend(batch)
                for j, i in enumerate(chunk):
                    out[i] = self._decode([o[j] for o in outputs], passes[i])
        return out  # type: ignore[return-value]

    def _decode(self, outputs: list[np.ndarray], p: _Pass) -> np.ndarray:
        """Candidate rows (score >= threshold) of one pass in original-image pixels, levels in order."""
        layout, threshold = self.layout, self.settings.threshold
        levels = layout.levels
        rows = []
        for level, stride in enumerate(layout.strides):
            scores = outputs[level].reshape(-1)
            grid_height, grid_width = p.canvas[0] // stride, p.canvas[1] // stride
            if scores.size != grid_height * grid_width * layout.num_anchors:
                raise ValueError(
                    f"stride {stride}: graph returned {scores.size} scores for a {p.canvas[1]}x{p.canvas[0]} input "
                    f"({grid_height}x{grid_width}x{layout.num_anchors} anchors expected)"
                )
            keep = np.flatnonzero(scores >= threshold)
            location = keep // layout.num_anchors
            centres = np.stack([location % grid_width, location // grid_width], axis=1).astype(np.float32) * stride
            distances = outputs[levels + level][keep] * stride
            level_rows = np.empty((len(keep), 15), dtype=np.float32)
            level_rows[:, 0:2] = centres - distances[:, 0:2]
            level_rows[:, 2:4] = centres + distances[:, 2:4]
            level_rows[:, 4] = scores[keep]
            if layout.keypoints:
                offsets = (outputs[2 * levels + level][keep] * stride).reshape(-1, 5, 2)
                level_rows[:, 5:15] = (centres[:, None, :] + offsets).reshape(-1, 10)
            else:
                level_rows[:, 5:15] = np.nan
            rows.append(level_rows)
        rows_all = np.concatenate(rows)
        if p.factor != 1.0:
            # insightface divides float32 boxes and points by the python-float det_scale (float32 result).
            rows_all[:, 0:4] /= p.factor
            rows_all[:, 5:15] /= p.factor
        return rows_all


# --- factory (CLI name: scrfd) --------------------------------------------------------------------------

_SETTING_NAMES = set(ScrfdSettings.__dataclass_fields__)


def create_scrfd(
    weights: str | os.PathLike | None = None, device: str = "cpu", pack: str | os.PathLike | None = None, **options: Any
) -> ScrfdDetector:
    """SCRFD from an insightface ONNX file (``weights``) or the detector of a model-pack folder (``pack``).

    Options: every :class:`ScrfdSettings` field, ``intra_op_threads`` (default ``torch.get_num_threads()``),
    ``runtime``: ``onnxruntime`` (default; insightface's numbers to the bit) or ``openvino`` (CPU, fp32; see
    :class:`ScrfdOpenVinoBackend`), and ``precision``: ``fp32`` (default), ``bf16`` (OpenVINO) or ``auto``
    (``facepipe.runtime.cpu.resolve_precision``; int8 is refused: detectors run fp32 or bf16).
    """
    settings = ScrfdSettings(**{k: v for k, v in options.items() if k in _SETTING_NAMES})
    rest = {k: v for k, v in options.items() if k not in _SETTING_NAMES}
    threads = rest.pop("intra_op_threads", None)
    runtime = rest.pop("runtime", "onnxruntime")
    precision = str(rest.pop("precision", None) or "fp32").lower()
    if rest:
        known = sorted(_SETTING_NAMES | {"intra_op_threads", "runtime", "precision"})
        raise TypeError(f"unknown SCRFD option(s) {sorted(rest)}; known: {', '.join(known)}")
    if runtime not in ("onnxruntime", "openvino"):
        raise ValueError(f"runtime must be 'onnxruntime' or 'openvino', got {runtime!r}")
    if runtime == "openvino" and device != "cpu":
        raise ValueError(f"the openvino runtime runs on the CPU, not {device}")
    if pack is not None:
        if weights is not None:
            raise ValueError("give SCRFD weights or a model pack, not both")
        from facepipe.models.insightface_pack import load_pack

        weights = load_pack(pack).require("detector")
    if weights is None:
        raise ValueError(
            "scrfd needs an insightface SCRFD .onnx (e.g. det_10g.onnx of buffalo_l): pass --detector-weights FILE "
            "or a model pack folder"
        )
    if precision == "int8":
        raise PrecisionError("precision int8 is for embedders; scrfd runs fp32 or bf16 (its outputs move too much in int8)")
    if resolve_precision(precision, "scrfd", device=device) == "bf16":
        return ScrfdDetector(ScrfdOpenVinoBackend(weights, intra_op_threads=threads, precision="bf16"), settings)
    if runtime == "openvino":
        return ScrfdDetector(ScrfdOpenVinoBackend(weights, intra_op_threads=threads), settings)
    return ScrfdDetector(ScrfdOnnxBackend(weights, device=device, intra_op_threads=threads), settings)
