"""Embedders backed by the PyTorch models of ``facepipe.models`` (MobileFaceNet, iresnet18..200).

The model's ``ModelConfig`` is the single source of its preprocessing: colour order, mean/std, input size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facepipe.embedding.base import Embedder, PairEmbedding, check_crops, embed_in_batches, preprocess
from facepipe.models.mobilefacenet import DEFAULT_WEIGHTS
from facepipe.models.registry import ModelConfig, create_model, get_config
from facepipe.weights import bundled


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, bool]:
    """Fold every BatchNorm that follows a convolution into it (inference only; ~10% faster on CPU).

    Uses torch.fx tracing; a model that cannot be traced is returned unchanged. BatchNorms that precede a
    convolution (iresnet's pre-activation ``bn1``) stay: folding them would be wrong at zero-padded borders.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model), True
    except Exception:  # noqa: BLE001 - tracing limits vary across torch versions; unfused is still correct
        return model, False


class TorchEmbedder(PairEmbedding):
    """``Embedder`` over a torch module: BGR crops in, raw ``(N, D)`` float32 out (flip test adds the mirror)."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        device: str = "cpu",
        batch_size: int = 64,
        fp16: bool = False,
        channels_last: bool = True,
        fuse_bn: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.device = torch.device(device)
        if fp16 and self.device.type != "cuda":
            raise ValueError("fp16 autocast is for CUDA devices; on CPU use float32")
        self.name = config.name
        self.config = config
        self.embedding_size = int(config.embedding_size or 0)
        self.batch_size = batch_size
        self.fp16 = fp16
        self.channels_last = channels_last
        self.model = model.to(self.device).eval()
        if hasattr(self.model, "fp16"):
            self.model.fp16 = fp16
        self.fused = False
        if fuse_bn and not fp16:
            self.model, self.fused = fold_batchnorm(self.model)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # oneDNN / cuDNN prefer NHWC convs

    def _forward(self, x: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(x).to(self.device, non_blocking=True)
        if self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.fp16):
            return self.model(tensor).float().cpu().numpy()

    def embed(self, crops: np.ndarray, flip: bool = True) -> np.ndarray:
        if self.device.type == "cuda":
            return self._embed_on_gpu(check_crops(crops, self.config), flip)
        return embed_in_batches(preprocess(crops, self.config), self._forward, self.batch_size, self.embedding_size, flip)

    def _embed_on_gpu(self, crops: np.ndarray, flip: bool) -> np.ndarray:
        """``preprocess`` + ``embed_in_batches`` with the uint8 crops uploaded and normalised on the GPU.

        The host would otherwise convert to float32 (4x the bytes to copy) and become the bottleneck of a fast
        GPU; the arithmetic is the same float32 subtract-and-scale, so the numbers do not change.
        """
        mean = torch.tensor(self.config.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        scale = 1.0 / torch.tensor(self.config.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        out = torch.empty((len(crops), self.embedding_size), dtype=torch.float32, device=self.device)
        step = max(1, self.batch_size // 2) if flip else self.batch_size
        with torch.inference_mode(), torch.autocast("cuda", enabled=self.fp16):
            for start in range(0, len(crops), step):
                chunk = torch.from_numpy(crops[start : start + step]).to(self.device, non_blocking=True)
                x = chunk.permute(0, 3, 1, 2).float()  # NHWC memory: already channels_last
                if self.config.input_format == "RGB":
                    x = x.flip(1)
                x = (x - mean) * scale
                if flip:
                    x = torch.cat([x, x.flip(3)])
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = self.model(x).float()
                n = len(chunk)
                out[start : start + n] = y[:n] + y[n:] if flip else y
        return out.cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchEmbedder({self.name}, device={self.device}, batch_size={self.batch_size}, fp16={self.fp16})"


BACKENDS = ("auto", "torch", "onnxruntime")
_TORCH_OPTIONS = {"batch_size", "fp16", "channels_last", "fuse_bn"}


def _split_options(options: dict[str, Any]) -> tuple[str, int | None, dict[str, Any]]:
    options = dict(options)
    backend = options.pop("backend", "auto") or "auto"
    threads = options.pop("threads", None)
    options.pop("precision", None)  # read by _build
    options.pop("calibrate", None)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    unknown = set(options) - _TORCH_OPTIONS
    if unknown:
        known = sorted(_TORCH_OPTIONS | {"backend", "threads", "precision", "calibrate"})
        raise TypeError(f"unknown embedder options: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return backend, threads, options


def _use_onnxruntime(backend: str, device: str, options: dict[str, Any]) -> bool:
    if backend != "auto":
        return backend == "onnxruntime"
    if device != "cpu" or options.get("fp16"):
        return False
    try:  # onnxruntime is an optional extra; torch is always there
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def exported_onnx_path(name: str, model: nn.Module, weights: str | os.PathLike) -> Path:
    """Our model exported to ONNX once per (architecture, weights file, torch version), cached on disk."""
    from facepipe.embedding.onnx_embedder import export_onnx  # lazily: onnx is an optional extra
    from facepipe.io.digest import digest_strings, file_fingerprint
    from facepipe.models.checkpoint import cache_dir

    key = digest_strings([name, file_fingerprint(weights), torch.__version__])[:20]
    path = cache_dir() / "onnx" / f"{name}-{key}.onnx"
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return export_onnx(model, get_config(name), path)
    except OSError:  # read-only cache (e.g. a locked-down worker): export for this process only
        folder = Path(tempfile.mkdtemp(prefix="facepipe-onnx-"))
        return export_onnx(model, get_config(name), folder / path.name)


def _build(name: str, model: nn.Module, weights: str | os.PathLike, device: str, options: dict[str, Any]) -> Embedder:
    """The torch embedder, or the same weights run by onnxruntime (``backend``: auto = onnxruntime on CPU).

    On CPU onnxruntime is faster than eager torch for these networks and degrades far less when other
    processes compete for the cores (REFERENCE.md); embeddings agree to float32 rounding (tested).
    """
    backend, threads, torch_options = _split_options(options)
    precision, calibrate = options.get("precision") or "fp32", options.get("calibrate")
    config = get_config(name)
    if not _use_onnxruntime(backend, device, torch_options):
        if precision not in ("fp32", "auto"):
            from facepipe.runtime.cpu import PrecisionError

            raise PrecisionError(
                f"precision {precision} runs on the CPU runtimes: use --device cpu with backend auto or onnxruntime "
                "(pip install 'facepipe[onnx]')"
            )
        return TorchEmbedder(model, config, device=device, **torch_options)
    from facepipe.embedding.onnx_embedder import OnnxEmbedder

    if torch_options.get("fp16"):
        raise ValueError("fp16 is a torch/CUDA option; use backend='torch'")
    runtime = OnnxEmbedder(
        exported_onnx_path(name, model, weights),
        device=device,
        batch_size=torch_options.get("batch_size", 64),
        threads=threads if threads is not None else torch.get_num_threads(),
        input_format=config.input_format,
        mean=config.mean,
        std=config.std,
        precision=precision,
        calibrate=calibrate,
        model_name=name,
    )
    runtime.name = config.name
    return runtime


def create_mobilefacenet(weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> Embedder:
    """The bundled foamliu MobileFaceNet (128-d), or ``weights`` in the same key layout."""
    path = bundled(DEFAULT_WEIGHTS) if weights is None else Path(weights)
    model = create_model("mobilefacenet", weights=path)
    return _build("mobilefacenet", model, path, device, options)


def _create_iresnet(name: str, weights: str | os.PathLike | None, device: str, options: dict[str, Any]) -> Embedder:
    if weights is None:
        raise ValueError(
            f"{name} needs weights: pass --weights backbone.pth (insightface arcface_torch model.pt / backbone.pth); "
            "no weights are bundled for it (insightface weights are licensed for non-commercial research only)"
        )
    model = create_model(name, weights=weights)
    return _build(name, model, weights, device, options)


def create_iresnet18(weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> Embedder:
    return _create_iresnet("iresnet18", weights, device, options)


def create_iresnet34(weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> Embedder:
    return _create_iresnet("iresnet34", weights, device, options)


def create_iresnet50(weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> Embedder:
    return _create_iresnet("iresnet50", weights, device, options)


def create_iresnet100(weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> Embedder:
    return _create_iresnet("iresnet100", weights, device, options)


def create_iresnet200(weights: str | os.PathLike | None = None, device: str = "cpu", **options: Any) -> Embedder:
    return _create_iresnet("iresnet200", weights, device, options)
