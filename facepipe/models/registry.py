"""Model registry (timm style): each architecture file registers its constructors with a default config.

``ModelConfig`` is the model's preprocessing contract. Every consumer reads it instead of guessing:
colour order, mean/std, input size, and where the default weights come from.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Literal

from torch import nn

ModelKind = Literal["detector", "embedder"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    kind: ModelKind
    input_format: Literal["RGB", "BGR"]
    mean: tuple[float, float, float]  # in input_format channel order, 0..255 pixel units
    std: tuple[float, float, float]
    input_size: tuple[int, int] | None  # (H, W); None = any size (detectors)
    embedding_size: int | None = None
    default_weights: str | None = None  # package-relative file name in facepipe/weights, or None
    weights_url: str | None = None  # where users download released weights
    weights_sha256: str | None = None
    licence: str = ""
    description: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RegisteredModel:
    config: ModelConfig
    build: Callable[..., nn.Module]


_REGISTRY: dict[str, RegisteredModel] = {}

# Modules whose import registers models; imported lazily so that `facepipe --help` stays fast.
_MODEL_MODULES = (
    "facepipe.models.retinaface",
    "facepipe.models.mtcnn",
    "facepipe.models.iresnet",
    "facepipe.models.mobilefacenet",
)


def register_model(config: ModelConfig) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if config.name in _REGISTRY:
            raise ValueError(f"model {config.name!r} registered twice")
        _REGISTRY[config.name] = RegisteredModel(config, build)
        return build

    return decorator


def _import_model_modules() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module
                raise


def list_models(kind: ModelKind | None = None) -> list[str]:
    _import_model_modules()
    return sorted(name for name, entry in _REGISTRY.items() if kind is None or entry.config.kind == kind)


def get_model_entry(name: str) -> RegisteredModel:
    _import_model_modules()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def get_config(name: str) -> ModelConfig:
    return get_model_entry(name).config


def create_model(name: str, **kwargs) -> nn.Module:
    return get_model_entry(name).build(**kwargs)
