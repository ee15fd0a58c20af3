import numpy as np
import pytest
import torch

from facepipe.models.checkpoint import CheckpointError, read_state_dict
from facepipe.models.mobilefacenet import DEFAULT_WEIGHTS, MobileFaceNet, mobilefacenet
from facepipe.models.registry import create_model, get_config
from facepipe.weights import bundled


def test_bundled_weights_cover_every_parameter_with_the_released_shapes():
    released = read_state_dict(bundled(DEFAULT_WEIGHTS))  # num_batches_tracked dropped by the reader
    ours = {k: v for k, v in MobileFaceNet().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in released.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert len(MobileFaceNet().state_dict()) == 307  # the released file's key count, counters included


def test_loads_bundled_weights_strictly_and_gives_128d():
    model = create_model("mobilefacenet").eval()
    released = read_state_dict(bundled(DEFAULT_WEIGHTS))
    for key, value in model.state_dict().items():
        if key in released:
            assert torch.equal(value, released[key]), key
    with torch.inference_mode():
        out = model(torch.zeros(3, 3, 112, 112))
    assert out.shape == (3, 128)
    assert torch.isfinite(out).all()


def test_network_reduces_112_to_one_pixel_before_the_embedding():
    model = MobileFaceNet().eval()
    shapes = {}

    def record(name):
        def hook(module, inputs, output):
            shapes[name] = tuple(output.shape)

        return hook

    model.features.register_forward_hook(record("features"))
    model.gdconv.register_forward_hook(record("gdconv"))
    with torch.inference_mode():
        model(torch.zeros(1, 3, 112, 112))
    assert shapes == {"features": (1, 128, 7, 7), "gdconv": (1, 512, 1, 1)}


def test_contract():
    config = get_config("mobilefacenet")
    assert config.input_format == "RGB" and config.input_size == (112, 112)
    assert config.mean == (127.5,) * 3 and config.std == (128.0,) * 3
    assert config.embedding_size == 128 and config.default_weights == DEFAULT_WEIGHTS


def test_incomplete_checkpoint_is_refused(tmp_path):
    state = read_state_dict(bundled(DEFAULT_WEIGHTS))
    del state["conv3.bias"]
    torch.save(state, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): conv3.bias"):
        mobilefacenet(weights=tmp_path / "cut.pt")


def test_random_init_without_weights():
    a = mobilefacenet(weights=None).state_dict()["conv1.0.weight"]
    b = read_state_dict(bundled(DEFAULT_WEIGHTS))["conv1.0.weight"]
    assert not np.allclose(a.numpy(), b.numpy())
