"""RetinaFace for many worker processes: one ONNX export, cached, that every worker loads instead of exporting.

On CPU the ``retinaface`` detector runs onnxruntime (``backend=auto``), which means exporting the network to ONNX
when the detector is built: a few seconds per process. ``worker_onnx_model`` exports it once per (weights, torch
version, network and export code) into ``<cache_dir>/onnx`` and returns the file, which workers then load with
``create_detector("retinaface-onnx", path)``: same graph, same detections; later runs find the file instead of
exporting again. Jobs ask for it instead of knowing which backend the factory would pick or where the bundled
weights are.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

from facepipe.io.atomic import atomic_write_bytes
from facepipe.io.digest import digest_strings, file_fingerprint

BUNDLED_RETINAFACE = "retinaface_mobilenet0.25.pth"  # what retinaface_mnet025(pretrained=True) loads
_EXPORT_CODE = ("facepipe.models.retinaface", "facepipe.detection.backends")  # a change to either: a new file


def worker_onnx_model(
    detector: str, weights: str | os.PathLike | None, device: str, options: dict[str, Any], scratch: str | os.PathLike
) -> str | None:
    """The cached ONNX export workers should load for ``create_detector(detector, weights, device, **options)``,
    or None when that detector would not export (not ``retinaface``, not CPU, torch backend or fp16 asked, ONNX
    weights given, onnxruntime missing). A read-only cache falls back to ``scratch`` (this run only)."""
    if detector != "retinaface" or device != "cpu":
        return None
    if options.get("fp16") or options.get("backend", "auto") not in ("auto", "onnxruntime"):
        return None
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):
        return None  # auto runs torch; an explicit onnxruntime fails in the workers with its own message
    from facepipe.models.checkpoint import cache_dir
    from facepipe.weights import bundled

    weights = Path(weights) if weights is not None else bundled(BUNDLED_RETINAFACE)
    if weights.suffix.lower() == ".onnx":
        return None  # the workers load it directly
    code = [file_fingerprint(importlib.util.find_spec(module).origin) for module in _EXPORT_CODE]  # read, not imported
    key = digest_strings([file_fingerprint(weights), importlib.metadata.version("torch"), importlib.metadata.version("onnx"), *code])
    path = cache_dir() / "onnx" / f"retinaface-mnet0.25-{key[:20]}.onnx"
    if path.is_file():
        return str(path)
    from facepipe.detection.backends import export_onnx
    from facepipe.models.retinaface import retinaface_mnet025

    data = export_onnx(retinaface_mnet025(weights=weights))
    try:
        atomic_write_bytes(path, data)  # two runs may export at once: each publishes one complete file
    except OSError:
        path = Path(scratch) / path.name
        atomic_write_bytes(path, data)
    return str(path)
