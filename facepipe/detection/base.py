"""The detector interface and the factory the CLI and pipelines use."""

from __future__ import annotations

import importlib
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from facepipe.types import Face


@runtime_checkable
class Detector(Protocol):
    """Batched face detector.

    ``detect`` takes a sequence of BGR uint8 ``(H, W, 3)`` images of any sizes and returns, for each image,
    its faces sorted by score (descending), boxes and landmarks in that image's pixel coordinates.
    """

    name: str

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]: ...


def check_images(images: Sequence[np.ndarray]) -> None:
    """``ValueError`` naming the first image that is not a non-empty uint8 ``(H, W, 3)`` array."""
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image {index}: expected a uint8 (H, W, 3) BGR array, got {got}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image {index}: empty image {image.shape}")


# CLI name -> (module, factory function). Factories take (weights=None, device="cpu", **options).
_DETECTOR_FACTORIES: dict[str, tuple[str, str]] = {
    "retinaface": ("facepipe.detection.retinaface", "create_retinaface_mnet"),
    "retinaface-r50": ("facepipe.detection.retinaface", "create_retinaface_r50"),
    "retinaface-onnx": ("facepipe.detection.retinaface", "create_retinaface_onnx"),
    "mtcnn": ("facepipe.detection.mtcnn", "create_mtcnn"),
    "scrfd": ("facepipe.detection.scrfd", "create_scrfd"),
}
DETECTOR_NAMES = tuple(_DETECTOR_FACTORIES)


def create_detector(
    name: str | None = None, weights: str | None = None, device: str = "cpu", pack: str | None = None, **options: Any
) -> Detector:
    """Build a detector by CLI name (default ``retinaface``); ``weights=None`` uses the bundled default where
    there is one. ``pack``: an insightface model-pack folder, whose SCRFD graph is the detector."""
    if pack is not None:
        if name not in (None, "scrfd"):
            raise ValueError(f"a model pack provides an SCRFD detector, not {name!r}")
        name, options = "scrfd", {**options, "pack": pack}
    name = name or "retinaface"
    try:
        module_name, factory_name = _DETECTOR_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose from {', '.join(DETECTOR_NAMES)}") from None
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(weights=weights, device=device, **options)


# Detector options the whole-dataset commands (detect, align, embed --detect) use unless the user sets them.
# MTCNN: zero-pad boxes that cross the image edge like the original MTCNN; facenet-pytorch's stretch (the
# library default, kept for parity) puts landmarks 20-100 px off on faces that fill the frame (CFP frontal).
# RetinaFace: a reduced-precision runtime (OpenVINO) pads its inputs to a few shapes, as it sets itself up for each
# new one and a data set's photos rarely share a size (an fp32 runtime never pads).
_RETINAFACE_PIPELINE = {"pad_reduced_precision": True}
_PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mtcnn": {"edge_padding": "zero"},
    "retinaface": _RETINAFACE_PIPELINE,
    "retinaface-r50": _RETINAFACE_PIPELINE,
    "retinaface-onnx": _RETINAFACE_PIPELINE,
}


def pipeline_detector_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``options`` completed with the per-detector defaults for whole-dataset runs; given options win."""
    return {**_PIPELINE_DEFAULTS.get(name, {}), **(options or {})}
