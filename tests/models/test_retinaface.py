
import cv2
import numpy as np
import pytest
import torch

from facepipe.models.checkpoint import CheckpointError
from facepipe.models.registry import create_model, get_config, list_models
from facepipe.models.retinaface import (
    RetinaFace,
    fold_batchnorm,
    load_onnx_weights,
    load_retinaface_weights,
    retinaface_mnet025,
    retinaface_r50,
)
from tests.conftest import shared_path
from tests.models.architecture_fill import fill_deterministic

RAW_KEYS = ("images/group/t1.jpg", "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg")


def reference_keys(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in shared_path("..", "keys", name).read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())))
    return rows


def fill_input() -> torch.Tensor:
    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")), cv2.IMREAD_COLOR).astype(np.float32)
    image = cv2.resize(image, (320, 224)) - np.array([104, 117, 123], dtype=np.float32)
    return torch.from_numpy(image.transpose(2, 0, 1)[None].copy())


def image_tensor(key: str) -> torch.Tensor:
    image = cv2.imread(str(shared_path(*key.split("/"))), cv2.IMREAD_COLOR).astype(np.float32)
    image -= np.array([104, 117, 123], dtype=np.float32)
    return torch.from_numpy(image.transpose(2, 0, 1)[None].copy())


@pytest.mark.parametrize("build, keys_file", [(retinaface_mnet025, "retina_mnet_keys.txt"), (retinaface_r50, "retina_r50_keys.txt")])
def test_state_dict_keys_and_shapes_equal_reference(build, keys_file):
    ours = [(k, tuple(v.shape)) for k, v in build().state_dict().items()]
    assert ours == reference_keys(keys_file)


@pytest.mark.parametrize("build, name", [(retinaface_mnet025, "mnet"), (retinaface_r50, "r50")])
def test_architecture_matches_reference_under_deterministic_fill(build, name):
    golden = np.load(shared_path("golden", "architecture_fill", "fill_outputs.npz"))
    model = build()
    fill_deterministic(model)
    model.eval()
    x = fill_input()
    with torch.no_grad():
        outputs = model(x)
    for output, part in zip(outputs, ("loc", "conf", "landm")):
        expected = golden[f"retinaface_{name}_{part}"]
        assert output.shape == expected.shape
        scale = np.abs(expected).max()
        assert np.abs(output.numpy() - expected).max() <= 1e-4 * scale, part
    fold_batchnorm(model)  # folding must not change the function
    with torch.no_grad():
        folded = model(x)
    for output, part in zip(folded, ("loc", "conf", "landm")):
        expected = golden[f"retinaface_{name}_{part}"]
        assert np.abs(output.numpy() - expected).max() <= 1e-4 * np.abs(expected).max(), part
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_training_mode_returns_logits_and_eval_mode_softmax():
    model = retinaface_mnet025()
    fill_deterministic(model)
    x = fill_input()
    model.train()
    loc_t, logits, landms_t = model(x)
    model.eval()
    with torch.no_grad():
        loc_e, conf, landms_e = model(x)
        loc_r, raw_logits, _ = model.forward_logits(x)
    assert torch.allclose(conf, torch.softmax(raw_logits, dim=-1))
    assert not torch.allclose(logits.sum(-1), torch.ones(1))  # training output is not normalised
    assert logits.requires_grad and loc_t.shape == loc_e.shape and landms_t.shape == landms_e.shape


def test_official_weights_reproduce_reference_raw_outputs():
    golden = np.load(shared_path("golden", "retinaface_mnet_shared_raw.npz"))
    model = retinaface_mnet025(pretrained=True)
    for key in RAW_KEYS:
        x = image_tensor(key)
        assert float(x.double().sum()) == pytest.approx(float(golden[f"{key}/input_sum"]), rel=1e-9)
        with torch.no_grad():
            outputs = model(x)
        for output, part in zip(outputs, ("loc", "conf", "landms")):
            assert np.abs(output.numpy() - golden[f"{key}/{part}"]).max() < 2e-4, (key, part)


def test_bundled_weights_equal_the_official_release():
    official = torch.load(shared_path("weights", "retinaface", "mobilenet0.25_Final.pth"), map_location="cpu", weights_only=True)
    bundled = retinaface_mnet025(pretrained=True).state_dict()
    for key, value in official.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(bundled[key], value), key


@pytest.mark.parametrize("variant", ["plain", "module_prefix", "state_dict_wrapper", "both"])
def test_loads_checkpoint_variants(tmp_path, variant):
    official = torch.load(shared_path("weights", "retinaface", "mobilenet0.25_Final.pth"), map_location="cpu", weights_only=True)
    state = dict(official)
    if variant in ("module_prefix", "both"):
        state = {f"module.{k}": v for k, v in state.items()}
    payload = {"state_dict": state, "epoch": 250} if variant in ("state_dict_wrapper", "both") else state
    path = tmp_path / f"{variant}.pth"
    torch.save(payload, path)
    model = retinaface_mnet025(weights=path)
    for key, value in official.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(model.state_dict()[key], value), key


def test_r50_loads_a_checkpoint_in_the_released_format(tmp_path):
    source = RetinaFace(retinaface_r50().spec)
    fill_deterministic(source)
    # Resnet50_Final.pth was saved from DataParallel: every key carries "module.".
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "Resnet50_Final.pth")
    model = create_model("retinaface_r50", weights=tmp_path / "Resnet50_Final.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not model.training


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    state = retinaface_mnet025().state_dict()
    del state["ssh2.conv3X3.1.weight"]
    state["ssh2.extra.weight"] = torch.zeros(3)
    state["ClassHead.0.conv1x1.bias"] = torch.zeros(6)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        retinaface_mnet025(weights=tmp_path / "bad.pth")
    message = str(info.value)
    assert "missing keys (1): ssh2.conv3X3.1.weight" in message
    assert "unexpected keys (1): ssh2.extra.weight" in message
    assert "ClassHead.0.conv1x1.bias: checkpoint (6,) vs model (4,)" in message


def test_mobilenet_weights_do_not_load_into_r50():
    with pytest.raises(CheckpointError, match="missing keys"):
        retinaface_r50(weights=shared_path("weights", "retinaface", "mobilenet0.25_Final.pth"))


def test_r50_without_weights_and_pretrained_says_where_to_get_them():
    with pytest.raises(CheckpointError, match="Resnet50_Final.pth"):
        retinaface_r50(pretrained=True)


def test_registry_configs_state_the_preprocessing_contract():
    assert {"retinaface_mnet025", "retinaface_r50"} <= set(list_models("detector"))
    for name in ("retinaface_mnet025", "retinaface_r50"):
        config = get_config(name)
        assert config.input_format == "BGR"
        assert config.mean == (104.0, 117.0, 123.0) and config.std == (1.0, 1.0, 1.0)
        assert config.input_size is None
    assert get_config("retinaface_mnet025").default_weights == "retinaface_mobilenet0.25.pth"
    assert get_config("retinaface_r50").default_weights is None


def test_tiny_onnx_loaded_into_torch_matches_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    path = shared_path("weights", "retinaface", "retinaface_mnet025_tiny.onnx")
    model = retinaface_mnet025(weights=path)
    assert model.batchnorm_folded
    x = image_tensor(RAW_KEYS[1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        outputs = model(x)
    for output, reference in zip(outputs, expected):
        assert np.abs(output.numpy() - reference).max() < 2e-4
    # It is a retrained model, not the official one: weights really came from the ONNX file.
    official = retinaface_mnet025(pretrained=True)
    with torch.no_grad():
        assert np.abs(official(x)[0].numpy() - expected[0]).max() > 0.1


def test_onnx_export_round_trips_into_a_folded_model(tmp_path):
    pytest.importorskip("onnx")
    from facepipe.detection.backends import export_onnx

    model = retinaface_mnet025(pretrained=True)
    export_onnx(model, tmp_path / "mnet.onnx")  # folds `model` in place
    restored = load_retinaface_weights(retinaface_mnet025(), tmp_path / "mnet.onnx")
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_onnx_of_another_architecture_is_refused(tmp_path):
    pytest.importorskip("onnx")
    from facepipe.detection.backends import export_onnx

    export_onnx(retinaface_mnet025(), tmp_path / "mnet.onnx")
    with pytest.raises(CheckpointError, match="trunk convs"):
        retinaface_r50(weights=tmp_path / "mnet.onnx")
    with pytest.raises(CheckpointError, match="folded"):
        load_onnx_weights(retinaface_mnet025(), tmp_path / "mnet.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(CheckpointError, match="cannot read ONNX"):
        retinaface_mnet025(weights=tmp_path / "garbage.onnx")
