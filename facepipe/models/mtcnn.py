"""MTCNN P-Net, R-Net and O-Net (Zhang et al. 2016) with the layer names of facenet-pytorch 2.6.0.

The released weights are facenet-pytorch's ``data/{pnet,rnet,onet}.pt`` state dicts (MIT, bundled here as
``mtcnn_{pnet,rnet,onet}.pt``); their keys are already our names, so the checkpoint filter only validates.

Preprocessing contract (all three nets): **RGB**, ``(x - 127.5) * 0.0078125`` (mean 127.5, std 128), float32.
P-Net is fully convolutional (any input of at least 12x12; one output cell per 2 pixels, 12x12 receptive
field); R-Net takes 24x24 crops, O-Net 48x48 crops. The cascade that drives them is
``facepipe.detection.mtcnn``.

Outputs: every net returns the box regression (offsets relative to the crop size) and the face probability
(softmax over the two logits, face column only); O-Net also returns 10 landmark values
``[x1..x5, y1..y5]`` as fractions of its input crop.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from facepipe.models.checkpoint import StateDict, load_weights
from facepipe.models.registry import ModelConfig, register_model
from facepipe.weights import bundled

DEFAULT_WEIGHTS = {"pnet": "mtcnn_pnet.pt", "rnet": "mtcnn_rnet.pt", "onet": "mtcnn_onet.pt"}
MEAN = 127.5
SCALE = 0.0078125  # 1/128: the reference multiplies rather than divides; both are exact here
_LICENCE = "MIT (facenet-pytorch 2.6.0 package data), bundled"


def _config(net: str, input_size: tuple[int, int] | None, description: str) -> ModelConfig:
    return ModelConfig(
        name=f"mtcnn_{net}",
        kind="detector",
        input_format="RGB",
        mean=(MEAN, MEAN, MEAN),
        std=(128.0, 128.0, 128.0),
        input_size=input_size,
        default_weights=DEFAULT_WEIGHTS[net],
        licence=_LICENCE,
        description=description,
    )


def normalize_rgb(images: torch.Tensor) -> torch.Tensor:
    """Float RGB pixels in 0..255 (N, 3, H, W) -> network input, exactly as facenet-pytorch computes it."""
    return (images - MEAN) * SCALE


def _face_probability(logits: torch.Tensor) -> torch.Tensor:
    # Softmax over both classes first (not a sigmoid of the difference) so the numbers match the reference bit for bit.
    return torch.softmax(logits, dim=1)[:, 1]


def _flatten_like_reference(x: torch.Tensor) -> torch.Tensor:
    # The dense layers were converted from a (W, H, C)-ordered Caffe/TF layout, hence the transposed flatten.
    return x.permute(0, 3, 2, 1).contiguous().flatten(1)


def _max_pool_2x2_ceil(x: torch.Tensor) -> torch.Tensor:
    """``MaxPool2d(2, 2, ceil_mode=True)`` as the maximum of four strided views (an odd last row or column is
    padded with -inf, so its windows hold only the real pixels). Maxima are exact, so the result is identical;
    on the channels-last 10-channel tensors P-Net pools, torch's pooling kernel is about 2x slower (measured)."""
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        x = F.pad(x, (0, width % 2, 0, height % 2), value=float("-inf"))
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class PNet(nn.Module):
    """Proposal net: (N, 3, H, W) -> regression (N, 4, H', W'), face probability (N, H', W')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor, conv1_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``conv1_mask`` (optional, True where masked, broadcast over the first conv's output): those values are
        set to -inf before the max-pool, so a pool window holds only the unmasked ones. Several inputs packed
        into one image (the detector's small pyramid levels) then pool exactly as they would alone, ceil-mode
        windows at their edges included; outputs that see a masked value are meaningless and must be dropped."""
        x = self.prelu1(self.conv1(x))
        if conv1_mask is not None:
            x = x.masked_fill(conv1_mask, float("-inf"))
        x = _max_pool_2x2_ceil(x)  # = self.pool1(...), bit for bit
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), _face_probability(self.conv4_1(x))


class RNet(nn.Module):
    """Refinement net: (N, 3, 24, 24) -> regression (N, 4), face probability (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(_flatten_like_reference(x)))
        return self.dense5_2(x), _face_probability(self.dense5_1(x))


class ONet(nn.Module):
    """Output net: (N, 3, 48, 48) -> regression (N, 4), landmarks (N, 10) ``[x1..x5, y1..y5]``, probability (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(_flatten_like_reference(x)))
        return self.dense6_2(x), self.dense6_3(x), _face_probability(self.dense6_1(x))


def checkpoint_filter(state_dict: StateDict, model: nn.Module | None = None) -> StateDict:
    """facenet-pytorch's keys are our names (its softmax layers hold no weights); strict loading checks the rest."""
    return dict(state_dict)


def _build(net: str, model: nn.Module, weights: str | os.PathLike | None) -> nn.Module:
    if weights is not None:
        path = bundled(DEFAULT_WEIGHTS[net]) if str(weights) == DEFAULT_WEIGHTS[net] else weights
        load_weights(model, path, checkpoint_filter)
    return model.eval()


@register_model(_config("pnet", None, "MTCNN proposal net (facenet-pytorch), fully convolutional"))
def mtcnn_pnet(weights: str | os.PathLike | None = DEFAULT_WEIGHTS["pnet"]) -> PNet:
    """``weights``: a path, the bundled file name (default), or None for random initialisation."""
    return _build("pnet", PNet(), weights)  # type: ignore[return-value]


@register_model(_config("rnet", (24, 24), "MTCNN refinement net (facenet-pytorch)"))
def mtcnn_rnet(weights: str | os.PathLike | None = DEFAULT_WEIGHTS["rnet"]) -> RNet:
    return _build("rnet", RNet(), weights)  # type: ignore[return-value]


@register_model(_config("onet", (48, 48), "MTCNN output net with 5 landmarks (facenet-pytorch)"))
def mtcnn_onet(weights: str | os.PathLike | None = DEFAULT_WEIGHTS["onet"]) -> ONet:
    return _build("onet", ONet(), weights)  # type: ignore[return-value]
