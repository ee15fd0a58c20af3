"""ArcFace improved ResNets (iresnet18/34/50/100/200) with the exact layout of insightface ``arcface_torch``.

Users bring their own ``backbone.pth`` / ``model.pt`` (a plain state dict, no ``module.`` prefix) or a
training checkpoint holding ``state_dict_backbone``; every released key (925 for r100) loads strictly.

Preprocessing contract: RGB, ``(x / 255 - 0.5) / 0.5`` i.e. mean = std = 127.5 in pixel units, 112x112,
512-d output before L2 normalisation.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from facepipe.models.checkpoint import (
    CheckpointError,
    StateDict,
    clean_state_dict,
    load_state_dict_strict,
    unwrap_state_dict,
)
from facepipe.models.registry import ModelConfig, register_model

BN_EPS = 1e-5  # arcface_torch passes eps=1e-05 explicitly everywhere
LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
_LICENCE = "architecture MIT (insightface); insightface released weights: non-commercial research only"


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus identity / projection; no activation after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes, eps=BN_EPS)
        self.conv1 = _conv3x3(in_planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + identity


class IResNet(nn.Module):
    """Stem (conv3x3 64, BN, PReLU), four stride-2 stages, then BN - flatten(512*7*7) - dropout - fc - BN1d."""

    fc_scale = 7 * 7

    def __init__(
        self,
        layers: tuple[int, int, int, int],
        num_features: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
    ) -> None:
        super().__init__()
        self.fp16 = fp16  # autocast the convolutional body on CUDA; fc and the feature BN stay in float32
        self._in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=BN_EPS)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # frozen in arcface_torch; kept so released keys load

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        # Every stage starts with stride 2 and a projection (the first stage too: 64 -> 64 at half resolution).
        downsample = nn.Sequential(
            nn.Conv2d(self._in_planes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=BN_EPS),
        )
        layers = [IBasicBlock(self._in_planes, planes, stride=2, downsample=downsample)]
        self._in_planes = planes
        layers.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=self.fp16 and x.is_cuda):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float()))


def checkpoint_filter(state_dict: StateDict, model: nn.Module | None = None) -> StateDict:
    """Map arcface_torch checkpoints onto ours: names are identical; drop a ``backbone.`` prefix if present."""
    if state_dict and all(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def read_iresnet_state_dict(path: str | os.PathLike) -> StateDict:
    """Read ``backbone.pth`` / ``model.pt`` or an arcface_torch training checkpoint (``state_dict_backbone``)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError... for bad or non-weights files
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict_backbone"), Mapping):
        return clean_state_dict(obj["state_dict_backbone"])
    return unwrap_state_dict(obj, source=str(path))


def load_iresnet_weights(model: IResNet, path: str | os.PathLike) -> IResNet:
    load_state_dict_strict(model, checkpoint_filter(read_iresnet_state_dict(path), model), source=str(path))
    return model


def _config(name: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        kind="embedder",
        input_format="RGB",
        mean=(127.5, 127.5, 127.5),
        std=(127.5, 127.5, 127.5),
        input_size=(112, 112),
        embedding_size=512,
        default_weights=None,  # users bring backbone.pth / model.pt from insightface arcface_torch
        licence=_LICENCE,
        description=f"arcface_torch {name}, blocks {LAYERS[name]}",
    )


def _build(name: str, weights: str | os.PathLike | None, **kwargs) -> IResNet:
    model = IResNet(LAYERS[name], **kwargs)
    if weights is not None:
        load_iresnet_weights(model, weights)
    return model


@register_model(_config("iresnet18"))
def iresnet18(weights: str | os.PathLike | None = None, **kwargs) -> IResNet:
    return _build("iresnet18", weights, **kwargs)


@register_model(_config("iresnet34"))
def iresnet34(weights: str | os.PathLike | None = None, **kwargs) -> IResNet:
    return _build("iresnet34", weights, **kwargs)


@register_model(_config("iresnet50"))
def iresnet50(weights: str | os.PathLike | None = None, **kwargs) -> IResNet:
    return _build("iresnet50", weights, **kwargs)


@register_model(_config("iresnet100"))
def iresnet100(weights: str | os.PathLike | None = None, **kwargs) -> IResNet:
    return _build("iresnet100", weights, **kwargs)


@register_model(_config("iresnet200"))
def iresnet200(weights: str | os.PathLike | None = None, **kwargs) -> IResNet:
    return _build("iresnet200", weights, **kwargs)
