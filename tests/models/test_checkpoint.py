import pytest
import torch
from torch import nn

from facepipe.models.checkpoint import CheckpointError, load_weights, read_state_dict


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def test_loads_prefixed_and_wrapped_checkpoints(tmp_path):
    source = Tiny()
    for p in source.parameters():
        nn.init.normal_(p)
    prefixed = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": prefixed, "epoch": 3}, tmp_path / "wrapped.pth")
    target = load_weights(Tiny(), tmp_path / "wrapped.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_mismatch_error_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = Tiny().state_dict()
    del state["bn.weight"]
    state["head.weight"] = torch.zeros(2)
    state["conv.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_weights(Tiny(), tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys (1): bn.weight" in message
    assert "unexpected keys (1): head.weight" in message
    assert "conv.bias: checkpoint (5,) vs model (4,)" in message


def test_refuses_pickled_objects_and_garbage(tmp_path):
    torch.save({"net": Tiny()}, tmp_path / "module.pth")  # a whole pickled module: needs unsafe unpickling
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        read_state_dict(tmp_path / "module.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "absent.pth")
