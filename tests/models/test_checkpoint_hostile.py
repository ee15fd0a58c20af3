import os

import pytest
import torch

from facepipe.detection.backends import OnnxRuntimeBackend
from facepipe.models.checkpoint import CheckpointError, load_onnx_model_checked, load_weights
from facepipe.models.retinaface import MNET025_SPEC, RetinaFace, fold_batchnorm, load_retinaface_weights


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)


def test_integer_tensors_for_float_parameters_are_refused(tmp_path):
    state = {k: v.clone() for k, v in Tiny().state_dict().items()}
    torch.save(state, tmp_path / "ok.pth")
    load_weights(Tiny(), tmp_path / "ok.pth")  # floats load
    state["conv.weight"] = (state["conv.weight"] * 100).to(torch.int32)
    torch.save(state, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"wrong-dtype keys \(1\): conv.weight: checkpoint torch.int32 vs model torch.float32"):
        load_weights(Tiny(), tmp_path / "int.pth")
    state["conv.weight"] = state["conv.weight"].to(torch.float16)  # another floating type is a cast, not garbage
    torch.save(state, tmp_path / "half.pth")
    load_weights(Tiny(), tmp_path / "half.pth")


@pytest.fixture
def garbage_onnx(tmp_path):
    path = tmp_path / "det.onnx"
    path.write_bytes(os.urandom(20_000))
    return path


def test_garbage_onnx_gives_one_line_everywhere(tmp_path, garbage_onnx):
    with pytest.raises(CheckpointError, match="cannot read ONNX file .*: (not an ONNX model|invalid model)") as info:
        load_onnx_model_checked(garbage_onnx)
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="cannot read ONNX file"):
        OnnxRuntimeBackend(garbage_onnx)
    model = fold_batchnorm(RetinaFace(MNET025_SPEC).eval())
    with pytest.raises(CheckpointError, match="cannot read ONNX file"):
        load_retinaface_weights(model, garbage_onnx)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no graph"):
        load_onnx_model_checked(tmp_path / "empty.onnx")
    os.mkfifo(tmp_path / "fifo.onnx")
    with pytest.raises(CheckpointError, match="FIFO"):
        load_onnx_model_checked(tmp_path / "fifo.onnx")


def test_fifo_weights_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match="cannot read weights file .*FIFO"):
        load_weights(Tiny(), tmp_path / "w.pth")


def test_int32_cast_retinaface_weights_are_refused(tmp_path):
    from facepipe.models.retinaface import retinaface_mnet025
    from facepipe.weights import bundled

    state = torch.load(bundled("retinaface_mobilenet0.25.pth"), map_location="cpu", weights_only=True)
    torch.save({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match="wrong-dtype keys"):
        retinaface_mnet025(weights=tmp_path / "int.pth")
