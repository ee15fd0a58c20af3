"""MTCNN P/R/O-Net: registry contract, strict loading of the facenet-pytorch weights, output shapes and values."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from facepipe.models import CheckpointError, create_model, get_config, list_models, load_weights
from facepipe.models.mtcnn import DEFAULT_WEIGHTS, ONet, PNet, RNet, checkpoint_filter, normalize_rgb
from facepipe.weights import bundled
from tests.conftest import shared_path

NETS = {"pnet": (PNet, None), "rnet": (RNet, (24, 24)), "onet": (ONet, (48, 48))}


@pytest.mark.parametrize("net", sorted(NETS))
def test_registry_states_the_facenet_pytorch_preprocessing_contract(net: str) -> None:
    name = f"mtcnn_{net}"
    assert name in list_models("detector")
    config = get_config(name)
    assert config.input_format == "RGB"
    assert config.mean == (127.5, 127.5, 127.5)
    assert config.std == (128.0, 128.0, 128.0)
    assert config.input_size == NETS[net][1]
    assert config.default_weights == DEFAULT_WEIGHTS[net]
    assert "MIT" in config.licence


def test_normalisation_is_minus_127_5_times_1_over_128() -> None:
    pixels = torch.tensor([0.0, 127.5, 128.0, 255.0])
    assert normalize_rgb(pixels).tolist() == [-0.99609375, 0.0, 0.00390625, 0.99609375]


@pytest.mark.shared
@pytest.mark.parametrize("net", sorted(NETS))
def test_bundled_weights_are_the_facenet_pytorch_files(net: str) -> None:
    original = shared_path("weights", "mtcnn", f"{net}.pt")
    digest = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(bundled(DEFAULT_WEIGHTS[net])) == digest(original)


@pytest.mark.parametrize("net", sorted(NETS))
def test_bundled_weights_load_strictly_and_every_key_is_used(net: str) -> None:
    model = create_model(f"mtcnn_{net}")
    state = torch.load(bundled(DEFAULT_WEIGHTS[net]), map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not model.training


def test_output_shapes_and_probabilities() -> None:
    torch.manual_seed(0)
    pnet, rnet, onet = (create_model(f"mtcnn_{n}") for n in ("pnet", "rnet", "onet"))
    with torch.inference_mode():
        # P-Net: conv3 -> pool2 (ceil) -> conv3 -> conv3, so 31 -> 29 -> 15 -> 13 -> 11 and 45 -> 43 -> 22 -> 20 -> 18.
        offsets, probs = pnet(torch.randn(2, 3, 31, 45))
        assert offsets.shape == (2, 4, 11, 18) and probs.shape == (2, 11, 18)
        offsets, probs = rnet(torch.randn(5, 3, 24, 24))
        assert offsets.shape == (5, 4) and probs.shape == (5,)
        offsets, landmarks, probs = onet(torch.randn(3, 3, 48, 48))
        assert offsets.shape == (3, 4) and landmarks.shape == (3, 10) and probs.shape == (3,)
        assert ((probs >= 0) & (probs <= 1)).all()


def test_pnet_finds_a_face_cell_on_a_real_face_and_not_on_flat_grey() -> None:
    """A 12x12 window on a face is a face to P-Net; a uniform grey window is not (real weights, real numbers)."""
    cv2 = pytest.importorskip("cv2")
    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")))
    # Face 0 of the golden output spans about x 465..570, y 262..405: resize that square to 12x12.
    face = cv2.resize(image[270:390, 460:580], (12, 12), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    grey = np.full((12, 12, 3), 128, np.uint8)
    batch = torch.from_numpy(np.stack([face, grey]).astype(np.float32)).permute(0, 3, 1, 2)
    with torch.inference_mode():
        _, probs = create_model("mtcnn_pnet")(normalize_rgb(batch))
    assert probs.shape == (2, 1, 1)
    assert probs[0, 0, 0] > 0.9
    assert probs[1, 0, 0] < 0.1


def test_flatten_order_matches_the_converted_dense_layout() -> None:
    """The dense input is flattened as (W, H, C): permuting the feature map's H and W must change the output."""
    rnet = RNet().eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.inference_mode():
        a = rnet(x)[1]
        b = rnet(x.transpose(2, 3))[1]
    assert not torch.allclose(a, b)


def test_wrong_weights_raise_a_clear_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="missing keys .*dense4"):
        load_weights(RNet(), bundled(DEFAULT_WEIGHTS["pnet"]), checkpoint_filter)

    state = torch.load(bundled(DEFAULT_WEIGHTS["onet"]), map_location="cpu", weights_only=True)
    state["dense6_3.weight"] = state["dense6_3.weight"][:8]  # a 4-landmark head
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad_onet.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(ONet(), path, checkpoint_filter)
    message = str(info.value)
    assert "dense6_3.weight: checkpoint (8, 256) vs model (10, 256)" in message
    assert "unexpected keys (1): extra.weight" in message


def test_random_init_when_weights_none() -> None:
    model = create_model("mtcnn_pnet", weights=None)
    bundled_state = torch.load(bundled(DEFAULT_WEIGHTS["pnet"]), map_location="cpu", weights_only=True)
    assert not torch.equal(model.state_dict()["conv1.weight"], bundled_state["conv1.weight"])


@pytest.mark.parametrize("height, width", [(10, 10), (11, 10), (10, 13), (13, 17), (1, 1), (2, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pnet_pool_is_torchs_ceil_mode_pool_bit_for_bit(height, width, channels_last):
    from facepipe.models.mtcnn import _max_pool_2x2_ceil

    x = torch.randn(2, 10, height, width, generator=torch.Generator().manual_seed(height * 100 + width)) - 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.nn.MaxPool2d(2, 2, ceil_mode=True)(x)
    assert torch.equal(_max_pool_2x2_ceil(x), expected)
