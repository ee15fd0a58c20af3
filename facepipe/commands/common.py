"""Options and helpers shared by several commands."""

from __future__ import annotations

import os

import click
import torch

from facepipe.detection.base import DETECTOR_NAMES
from facepipe.embedding.base import EMBEDDER_NAMES

detector_option = click.option(
    "--detector", type=click.Choice(DETECTOR_NAMES), default="retinaface", show_default=True,
    help="Face detector. 'retinaface' uses the bundled MobileNet-0.25 weights.",
)
detector_weights_option = click.option(
    "--detector-weights", "detector_weights", type=click.Path(dir_okay=False), default=None,
    help="Detector weights file (.pth or .onnx); default: bundled weights where available.",
)
model_option = click.option(
    "--model", type=click.Choice(EMBEDDER_NAMES), default="mobilefacenet", show_default=True,
    help="Embedding model. 'mobilefacenet' uses the bundled weights; 'onnx' needs --weights FILE.onnx.",
)
device_option = click.option(
    "--device", type=str, default="cpu", show_default=True, help="cpu, cuda or cuda:N.",
)
threads_option = click.option(
    "--threads", type=int, default=None, help="CPU threads for torch/onnxruntime (default: all cores).",
)
precision_option = click.option(
    "--precision", type=click.Choice(["fp32", "bf16", "int8", "auto"]), default="fp32", show_default=True,
    help="CPU inference precision: fp32 exact; bf16 (OpenVINO, CPUs with avx512_bf16); int8 (embedders, after "
    "`facepipe quantize`); auto = the fastest this CPU supports that passed the accuracy report (README).",
)


def check_detector_precision(precision: str, detector: str, device: str) -> None:
    """Fail at the command boundary, in one line, before workers start: int8 (embedders only), a detector
    without reduced precision, or a precision this CPU / installation cannot run."""
    from facepipe.runtime.cpu import PrecisionError, resolve_precision

    if precision == "fp32":
        return
    if precision == "int8":
        raise click.UsageError("--precision int8 is for embedders; detectors run fp32, bf16 or auto")
    if not detector.startswith("retinaface"):
        raise click.UsageError(f"--precision {precision} is for the RetinaFace detectors; {detector} runs fp32")
    try:
        resolve_precision(precision, detector, device=device)
    except PrecisionError as exc:
        raise click.ClickException(str(exc)) from None


def resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device} requested but CUDA is not available on this machine")
    return device


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise click.UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
