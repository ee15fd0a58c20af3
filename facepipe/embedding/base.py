"""The embedder interface, the crop contract every embedder shares, and the factory the CLI and evaluations use.

This module imports neither torch nor onnxruntime: ``check_crops`` and ``preprocess`` live here so that each
runtime's embedder depends on this module only, never on the other runtime's.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from facepipe.models.registry import ModelConfig


@runtime_checkable
class Embedder(Protocol):
    """Batched face embedder.

    ``embed`` takes aligned crops ``(N, H, W, 3)`` uint8 **BGR** (the facepipe image contract; the embedder
    converts to its model's colour order and normalisation) and returns ``(N, D)`` float32 embeddings,
    **not** L2-normalised, so the norm stays available as a quality weight. With ``flip=True`` the result is
    the sum of the embeddings of each crop and its horizontal mirror (insightface's flip test).
    """

    name: str
    embedding_size: int

    def embed(self, crops: np.ndarray, flip: bool = True) -> np.ndarray: ...

    def embed_pair(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class PairEmbedding:
    """``embed_pair`` for any class with ``embed``: the plain and the mirrored crops' embeddings, separately
    (IJB-C's F switch and the verification caches keep both), from one batched call."""

    def embed_pair(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        crops = np.asarray(crops)
        both = self.embed(np.concatenate([crops, crops[:, :, ::-1]]), flip=False)  # type: ignore[attr-defined]
        return both[: len(crops)], both[len(crops) :]


# CLI name -> (module, factory function). Factories take (weights=None, device="cpu", **options).
_EMBEDDER_FACTORIES: dict[str, tuple[str, str]] = {
    "mobilefacenet": ("facepipe.embedding.torch_embedder", "create_mobilefacenet"),
    "iresnet18": ("facepipe.embedding.torch_embedder", "create_iresnet18"),
    "iresnet34": ("facepipe.embedding.torch_embedder", "create_iresnet34"),
    "iresnet50": ("facepipe.embedding.torch_embedder", "create_iresnet50"),
    "iresnet100": ("facepipe.embedding.torch_embedder", "create_iresnet100"),
    "iresnet200": ("facepipe.embedding.torch_embedder", "create_iresnet200"),
    "onnx": ("facepipe.embedding.onnx_embedder", "create_onnx_embedder"),
}
EMBEDDER_NAMES = tuple(_EMBEDDER_FACTORIES)


def create_embedder(
    name: str | None = None, weights: str | None = None, device: str = "cpu", pack: str | None = None, **options: Any
) -> Embedder:
    """Build an embedder by CLI name (default ``mobilefacenet``); ``weights=None`` uses the bundled default where
    there is one. ``pack``: an insightface model-pack folder, whose 112x112 recognition ONNX is the embedder."""
    if pack is not None:
        if name not in (None, "onnx") or weights is not None:
            raise ValueError("a model pack provides the ONNX embedder itself: give no other model name or weights")
        from facepipe.models.insightface_pack import load_pack

        name, weights = "onnx", str(load_pack(pack).require("recognition"))
    name = name or "mobilefacenet"
    try:
        module_name, factory_name = _EMBEDDER_FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown embedding model {name!r}; choose from {', '.join(EMBEDDER_NAMES)}") from None
    factory = getattr(importlib.import_module(module_name), factory_name)
    return factory(weights=weights, device=device, **options)


def embed_in_batches(
    x: np.ndarray, forward: Callable[[np.ndarray], np.ndarray], batch_size: int, embedding_size: int, flip: bool
) -> np.ndarray:
    """Run ``forward`` over preprocessed NCHW ``x`` in batches; with ``flip``, add each mirror's embedding.

    Crops and their mirrors go through one forward each batch (half the crops per batch), which batches better
    than two passes at the same memory.
    """
    out = np.empty((len(x), embedding_size), dtype=np.float32)
    step = max(1, batch_size // 2) if flip else batch_size
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        if flip:
            both = forward(np.concatenate([chunk, chunk[..., ::-1]]))
            out[start : start + len(chunk)] = both[: len(chunk)] + both[len(chunk) :]
        else:
            out[start : start + len(chunk)] = forward(chunk)
    return out


def check_crops(crops: np.ndarray, config: "ModelConfig") -> np.ndarray:
    """Validate ``(N, H, W, 3)`` (or one ``(H, W, 3)``) uint8 BGR crops of the model's input size."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected crops of shape (N, H, W, 3), got {crops.shape}")
    if crops.dtype != np.uint8:
        raise ValueError(f"expected uint8 BGR crops, got dtype {crops.dtype}")
    if config.input_size is not None and tuple(crops.shape[1:3]) != tuple(config.input_size):
        h, w = config.input_size
        raise ValueError(
            f"{config.name} expects aligned {h}x{w} crops, got {crops.shape[1]}x{crops.shape[2]}; "
            f"align with `facepipe align --size {h}`" + ("" if h == w else f"x{w}")
        )
    return crops


def preprocess(crops: np.ndarray, config: "ModelConfig") -> np.ndarray:
    """``(N, H, W, 3)`` uint8 BGR -> ``(N, 3, H, W)`` float32 in the model's colour order and normalisation."""
    crops = check_crops(crops, config)
    if config.input_format == "RGB":
        crops = crops[..., ::-1]
    mean = np.asarray(config.mean, dtype=np.float32)
    scale = 1.0 / np.asarray(config.std, dtype=np.float32)
    x = (crops.astype(np.float32) - mean) * scale
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Unit-length rows (zero rows stay zero): the one L2 normaliser of stored and queried embeddings."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, eps)
