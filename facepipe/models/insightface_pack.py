"""insightface model-pack folders (``buffalo_l``, ``buffalo_s``, ``buffalo_m``, ``antelopev2``, ...).

A pack is a folder of ONNX files, one per task. Files are told apart by their graphs, never by their names
(packs rename them: ``det_10g.onnx`` / ``scrfd_10g_bnkps.onnx``, ``w600k_r50.onnx`` / ``glintr100.onnx``):

* **detector**: a SCRFD graph (:func:`facepipe.detection.scrfd.scrfd_layout`: 6, 9, 10 or 15 outputs of
  scores / boxes / keypoints per stride);
* **recognition**: one ``(N, 3, 112, 112)`` image input and one ``(N, D)`` output (the ArcFace models);
* anything else (106-point and 68-point landmarks on 192x192, gender/age on 96x96, ...) is listed as ignored.

A pack with two detectors or two recognition models is refused rather than guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from facepipe.io.files import check_regular_file

Kind = Literal["detector", "recognition", "other"]

RECOGNITION_INPUT = (112, 112)


@dataclass(frozen=True)
class PackModel:
    path: Path
    kind: Kind
    description: str  # what the graph is, in words


@dataclass(frozen=True)
class ModelPack:
    root: Path
    models: tuple[PackModel, ...]

    def of_kind(self, kind: Kind) -> list[PackModel]:
        return [m for m in self.models if m.kind == kind]

    @property
    def detector(self) -> Path | None:
        found = self.of_kind("detector")
        return found[0].path if found else None

    @property
    def recognition(self) -> Path | None:
        found = self.of_kind("recognition")
        return found[0].path if found else None

    @property
    def ignored(self) -> list[PackModel]:
        return self.of_kind("other")

    def require(self, kind: Literal["detector", "recognition"]) -> Path:
        """The pack's model of ``kind``, or ``ValueError`` saying what the folder holds."""
        found = self.of_kind(kind)
        if not found:
            holds = "; ".join(f"{m.path.name}: {m.description}" for m in self.models) or "no .onnx files"
            what = "SCRFD detector" if kind == "detector" else "112x112 recognition model"
            raise ValueError(f"model pack {self.root} has no {what} ({holds})")
        return found[0].path

    def summary(self) -> str:
        return "\n".join(f"{m.kind:<11} {m.path.name}: {m.description}" for m in self.models)


def classify_graph(model: Any) -> tuple[Kind, str]:
    """(kind, description) of a loaded ONNX model, from its inputs and outputs only."""
    from facepipe.detection.scrfd import describe_graph, graph_inputs, scrfd_layout, tensor_dims

    try:
        layout = scrfd_layout(model)
    except ValueError:
        pass
    else:
        keypoints = "with" if layout.keypoints else "without"
        strides = "/".join(map(str, layout.strides))
        return "detector", f"SCRFD, strides {strides}, {layout.num_anchors} anchor(s), {keypoints} keypoints"
    inputs = graph_inputs(model)
    outputs = list(model.graph.output)
    if len(inputs) == 1 and len(outputs) == 1:
        in_dims, out_dims = tensor_dims(inputs[0]), tensor_dims(outputs[0])
        square = in_dims[2:4] if len(in_dims) == 4 and in_dims[1] == 3 else None
        if square == list(RECOGNITION_INPUT) and len(out_dims) == 2:
            return "recognition", f"recognition, 112x112 input, {out_dims[1] or '?'}-d embedding"
        if square and square[0] == square[1] and square[0] is not None and len(out_dims) == 2:
            width = out_dims[1]
            guess = {212: "106-point landmarks", 3309: "68-point 3D landmarks", 3: "gender/age"}.get(width or 0, "another task")
            return "other", f"{guess} ({describe_graph(model)})"
    return "other", describe_graph(model)


def load_pack(directory: str | os.PathLike) -> ModelPack:
    """Classify every ``.onnx`` file directly in ``directory`` (sorted by name)."""
    import onnx

    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"model pack folder not found: {root}")
    models = []
    for path in sorted(root.glob("*.onnx")):
        try:
            check_regular_file(path)  # a FIFO named *.onnx must not hang the listing
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - a broken file is listed, not fatal
            models.append(PackModel(path, "other", f"unreadable ONNX ({type(exc).__name__})"))
            continue
        kind, description = classify_graph(proto)
        models.append(PackModel(path, kind, description))
    pack = ModelPack(root, tuple(models))
    for kind in ("detector", "recognition"):
        found = pack.of_kind(kind)  # type: ignore[arg-type]
        if len(found) > 1:
            raise ValueError(f"model pack {root} has {len(found)} {kind} models ({', '.join(m.path.name for m in found)}): keep one")
    return pack
