"""MobileFaceNet as released by foamliu/MobileFaceNet (ArcFace loss, refined MS1M, 128-d embeddings).

Layout read from the released state dict (307 keys) and the upstream model definition:
stem ConvBNReLU6 3->64 stride 2; depthwise-separable 64->64 with plain ReLU; 15 inverted residual blocks
(expansion, channels, repeats, stride) = (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2) (2,128,2,1) with ReLU6;
1x1 ConvBNReLU6 128->512; global depthwise 7x7 conv + BN; 1x1 conv 512->128 with bias; BN.

Preprocessing contract: RGB, ``(x - 127.5) / 128``, 112x112, 128-d output before L2 normalisation.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from facepipe.models.checkpoint import StateDict, load_weights
from facepipe.models.registry import ModelConfig, register_model
from facepipe.weights import bundled

DEFAULT_WEIGHTS = "mobilefacenet_foamliu.pt"
# (expansion, output channels, repeats, stride of the first repeat)
INVERTED_RESIDUAL_SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

CONFIG = ModelConfig(
    name="mobilefacenet",
    kind="embedder",
    input_format="RGB",
    mean=(127.5, 127.5, 127.5),
    std=(128.0, 128.0, 128.0),
    input_size=(112, 112),
    embedding_size=128,
    default_weights=DEFAULT_WEIGHTS,
    licence="Apache-2.0 (foamliu/MobileFaceNet), bundled",
    description="foamliu MobileFaceNet, ArcFace on refined MS1M",
)


class ConvBNReLU6(nn.Sequential):
    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 - BN - ReLU - pointwise 1x1 - BN - ReLU (plain ReLU here, unlike the ReLU6 elsewhere)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_planes, in_planes, 3, padding=1, groups=in_planes, bias=False)
        self.pointwise = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.bn2 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.depthwise(x)))
        return torch.relu(self.bn2(self.pointwise(x)))


class GlobalDepthwiseConv(nn.Module):
    """7x7 depthwise conv without padding (the 7x7 map becomes 1x1), then BN; no activation."""

    def __init__(self, planes: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(planes, planes, kernel_size, groups=planes, bias=False)
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.depthwise(x))


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) - 3x3 depthwise (ReLU6) - 1x1 linear projection; residual when shapes allow."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        self.conv = nn.Sequential(
            ConvBNReLU6(in_planes, hidden, kernel_size=1),
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 128) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU6(3, 64, stride=2)
        self.dw_conv = DepthwiseSeparableConv(64, 64)
        blocks: list[nn.Module] = []
        in_planes = 64
        for expansion, out_planes, repeats, stride in INVERTED_RESIDUAL_SETTING:
            for i in range(repeats):
                blocks.append(InvertedResidual(in_planes, out_planes, stride if i == 0 else 1, expansion))
                in_planes = out_planes
        self.features = nn.Sequential(*blocks)
        self.conv2 = ConvBNReLU6(in_planes, 512, kernel_size=1)
        self.gdconv = GlobalDepthwiseConv(512)
        self.conv3 = nn.Conv2d(512, embedding_size, kernel_size=1)
        self.bn = nn.BatchNorm2d(embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.dw_conv(self.conv1(x)))
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return torch.flatten(x, 1)


def checkpoint_filter(state_dict: StateDict, model: nn.Module | None = None) -> StateDict:
    """The released keys are our names already (``module.`` prefixes are stripped by the reader)."""
    return dict(state_dict)


@register_model(CONFIG)
def mobilefacenet(weights: str | os.PathLike | None = DEFAULT_WEIGHTS, **kwargs) -> MobileFaceNet:
    """``weights``: a path, the bundled file name (default), or None for random initialisation."""
    model = MobileFaceNet(**kwargs)
    if weights is not None:
        path = bundled(DEFAULT_WEIGHTS) if str(weights) == DEFAULT_WEIGHTS else weights
        load_weights(model, path, checkpoint_filter)
    return model
