"""What this CPU can run fast, and the one rule that turns a requested ``precision`` into the one to run.

Precisions (``--precision`` / ``precision=``):

* ``fp32`` -- the default: the network exactly as trained (onnxruntime float32; every parity test uses it).
* ``bf16`` -- OpenVINO with ``INFERENCE_PRECISION_HINT=bf16``. Needs the ``avx512_bf16`` (or AMX) instructions:
  without them OpenVINO would emulate bf16 and be slower than fp32, so it is refused rather than run.
* ``int8`` -- a static int8 (QDQ, per-channel weights) copy of the network calibrated on the user's own
  aligned crops (``facepipe quantize``), run by onnxruntime. Needs VNNI (``avx512_vnni``, ``avx_vnni`` or AMX):
  without it int8 convolutions are no faster than fp32. Embedders only: detector outputs move too much.
* ``auto`` -- the first precision of the model's ``AUTO_ORDER`` row (fastest first, each one passed the
  accuracy goals of ``eval/precision_report.py`` on this model) that this CPU and installation support;
  fp32 when none does. Never an error.

Capabilities come from ``/proc/cpuinfo`` flags; tests inject a flag set to simulate other CPUs.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
from pathlib import Path
from typing import Iterable, Literal

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS = ("fp32", "bf16", "int8", "auto")

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

# Reduced precisions that met the accuracy goals (verification within 0.2 pt, WIDER AP within 0.003) and
# the speed goal in eval/precision_report.py, fastest first; README "Reduced precision" holds the figures.
# int8 is only picked when a calibration exists for the model (facepipe quantize).
AUTO_ORDER: dict[str, tuple[Precision, ...]] = {
    "mobilefacenet": ("bf16",),
    "iresnet18": ("bf16",),
    "iresnet34": ("bf16",),
    "iresnet50": ("bf16",),
    "iresnet100": ("bf16",),
    "iresnet200": ("bf16",),
    "onnx": ("bf16",),
    "scrfd": ("bf16",),
    "retinaface": ("bf16",),
    "retinaface-r50": ("bf16",),
    "retinaface-onnx": ("bf16",),
}


class PrecisionError(ValueError):
    """A precision this CPU, installation or model cannot run; the message is one line for the user."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_summary(flags: Iterable[str] | None = None) -> str:
    """``"AMD EPYC (avx512_bf16 avx512_vnni ...)"``: the line every benchmark prints."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    shown = sorted(flags & (BF16_FLAGS | INT8_FLAGS | {"avx2", "avx512f", "fma", "amx_tile"}))
    return f"{cpu_model()} ({' '.join(shown) or 'no avx2/avx512'})"


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def unsupported_reason(precision: str, flags: Iterable[str] | None = None, has_openvino: bool | None = None) -> str | None:
    """Why ``precision`` cannot run here (one line), or None when it can. ``auto`` always can."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if precision not in PRECISIONS:
        return f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "bf16":
        if not flags & BF16_FLAGS:
            return "precision bf16 needs a CPU with avx512_bf16 or amx_bf16 (this one has neither); use fp32 or auto"
        if not (openvino_available() if has_openvino is None else has_openvino):
            return "precision bf16 runs on OpenVINO: pip install 'facepipe[openvino]'"
    if precision == "int8" and not flags & INT8_FLAGS:
        return "precision int8 needs a CPU with VNNI (avx512_vnni, avx_vnni or amx_int8); use fp32 or auto"
    return None


def resolve_precision(
    precision: str,
    model: str,
    flags: Iterable[str] | None = None,
    has_openvino: bool | None = None,
    has_calibration: bool = False,
    device: str = "cpu",
) -> Precision:
    """The precision to run ``model`` in: ``precision`` itself when it can run, raising :class:`PrecisionError`
    when it cannot; for ``auto`` the first supported entry of ``AUTO_ORDER[model]``, else fp32."""
    precision = (precision or "fp32").lower()
    if precision == "fp32":
        return "fp32"
    if precision != "auto" and not device.startswith("cpu"):
        raise PrecisionError(f"precision {precision} is a CPU option; on {device} use fp32 (or fp16 where offered)")
    if precision == "auto":
        if not device.startswith("cpu"):
            return "fp32"
        for candidate in AUTO_ORDER.get(model, ()):
            if candidate == "int8" and not has_calibration:
                continue
            if unsupported_reason(candidate, flags, has_openvino) is None:
                return candidate
        return "fp32"
    reason = unsupported_reason(precision, flags, has_openvino)
    if reason is not None:
        raise PrecisionError(reason)
    return precision  # type: ignore[return-value]
