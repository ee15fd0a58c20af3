"""Options and helpers shared by several commands."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import click
import torch

from facepipe.detection.base import DETECTOR_NAMES
from facepipe.embedding.base import EMBEDDER_NAMES


class AliasedOption(click.Option):
    """An option that also accepts older spellings (``hidden_aliases``) without showing them in --help."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = self.opts
        self.opts = [opt for opt in shown if opt not in self.hidden_aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def aliased_option(*param_decls: str, hidden_aliases: tuple[str, ...] = (), **attrs: Any) -> Callable:
    """``click.option`` whose ``hidden_aliases`` (old spellings) still work but are not advertised."""
    return click.option(*param_decls, *hidden_aliases, cls=AliasedOption, hidden_aliases=hidden_aliases, **attrs)


# One spelling per meaning across commands (old spellings stay accepted as hidden aliases):
#   --min-score          the face score below which detections are ignored (was --threshold in detect);
#   --detector-weights   the face detector's weights (was --weights in detect);
#   --weights            the embedding model's weights (embed, eval, index);
#   $FACEPIPE_HOME       the cache folder (facepipe.models.checkpoint.cache_dir; $FACEPIPE_CACHE is a fallback).
detector_option = click.option(
    "--detector", type=click.Choice(DETECTOR_NAMES), default="retinaface", show_default=True,
    help="Face detector. 'retinaface' uses the bundled MobileNet-0.25 weights; 'scrfd' needs an insightface "
    "SCRFD .onnx (--detector-weights) or a model pack (--pack, where offered).",
)
detector_weights_option = aliased_option(
    "--detector-weights", "detector_weights", type=click.Path(dir_okay=False), default=None,
    help="Detector weights file (.pth or .onnx); default: bundled weights where available.",
)
# detect has no embedding model, and it spelled the detector weights --weights: keep that working there.
detect_weights_option = aliased_option(
    "--detector-weights", "detector_weights", hidden_aliases=("--weights",), type=click.Path(dir_okay=False, exists=True),
    default=None, help="Detector weights file (.pth or .onnx); default: bundled weights where available.",
)
min_score_option = aliased_option(
    "--min-score", "min_score", hidden_aliases=("--threshold",), type=click.FloatRange(0.0, 1.0), default=0.5,
    show_default=True, help="Minimum face score: detections scoring below it are ignored.",
)
model_option = click.option(
    "--model", type=click.Choice(EMBEDDER_NAMES), default="mobilefacenet", show_default=True,
    help="Embedding model. 'mobilefacenet' uses the bundled weights; 'onnx' needs --weights FILE.onnx.",
)
pack_option = click.option(
    "--pack", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
    help="insightface model-pack folder (buffalo_l, buffalo_s, antelopev2, ...): its SCRFD graph is the detector and, where "
    "the command embeds, its 112x112 recognition graph the model (--model onnx).",
)
weights_option = click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False), default=None,
    help="Embedding model weights: backbone.pth / model.pt for iresnet*, a .onnx file for --model onnx "
    "[default: the bundled weights for mobilefacenet].",
)
device_option = click.option(
    "--device", type=str, default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.",
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
    if not (detector.startswith("retinaface") or detector == "scrfd"):
        raise click.UsageError(f"--precision {precision} is for the RetinaFace and SCRFD detectors; {detector} runs fp32")
    try:
        resolve_precision(precision, detector, device=device)
    except PrecisionError as exc:
        raise click.ClickException(str(exc)) from None


def _pack_models(pack: Path, *kinds: str) -> list[str]:
    """The pack's model files of ``kinds`` (``detector``, ``recognition``), read once; ignored models are named."""
    from facepipe.models.insightface_pack import load_pack

    try:
        found = load_pack(pack)
        paths = [str(found.require(kind)) for kind in kinds]  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    for model in found.ignored:
        click.echo(f"model pack: ignoring {model.path.name} ({model.description})", err=True)
    return paths


def apply_pack(pack: Path | None, detector: str, weights: str | None) -> tuple[str, str | None]:
    """(detector, weights) with ``--pack``: the pack's SCRFD file; models found are reported, ignored ones named."""
    if pack is None:
        return detector, weights
    if weights is not None:
        raise click.UsageError("give --pack or detector weights, not both")
    return "scrfd", _pack_models(pack, "detector")[0]


def pack_recognition(pack: Path, weights: str | None) -> tuple[str, str]:
    """(model, weights) with ``--pack``: the pack's 112x112 recognition model, run as ``--model onnx``."""
    if weights is not None:
        raise click.UsageError("give --pack or --weights, not both")
    return "onnx", _pack_models(pack, "recognition")[0]


def apply_pack_models(
    pack: Path | None, detector: str, detector_weights: str | None, model: str, weights: str | None
) -> tuple[str, str | None, str, str | None]:
    """(detector, detector weights, model, weights) with ``--pack``: the pack's SCRFD detector and its 112x112
    recognition model (``--model onnx``), as insightface's ``FaceAnalysis`` would run them."""
    if pack is None:
        return detector, detector_weights, model, weights
    if weights is not None or detector_weights is not None:
        raise click.UsageError("give --pack or --weights / --detector-weights, not both")
    detector_file, recognition = _pack_models(pack, "detector", "recognition")
    return "scrfd", detector_file, "onnx", recognition


_DEVICE_PATTERN = re.compile(r"cpu|mps|cuda(:\d+)?")


def resolve_device(device: str) -> str:
    """Check ``--device`` (cpu, cuda, cuda:N or mps) against this machine; a bad value is one usage error."""
    device = device.strip().lower()
    if not _DEVICE_PATTERN.fullmatch(device):
        raise click.UsageError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise click.UsageError(f"--device {device} requested but CUDA is not available on this machine")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise click.UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise click.UsageError("--device mps requested but MPS is not available on this machine")
    return device


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise click.UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
