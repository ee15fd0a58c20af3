
import cv2
import numpy as np
import pytest
import torch

from facepipe.models.checkpoint import CheckpointError
from facepipe.models.iresnet import LAYERS, IResNet, load_iresnet_weights
from facepipe.models.registry import create_model, get_config, list_models
from tests.conftest import SHARED, shared_path
from tests.models.architecture_fill import fill_deterministic


def read_key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = SHARED / "keys" / f"{name}_keys.txt"
    if not path.is_file():
        pytest.skip(f"shared key list not available: {path}")
    rows = []
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(v) for v in shape.strip("()").split(",") if v.strip())))
    return rows


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100"])
def test_state_dict_keys_and_shapes_match_arcface_torch(name):
    expected = read_key_list(name)
    ours = [(k, tuple(v.shape)) for k, v in create_model(name).state_dict().items()]
    assert ours == expected
    if name == "iresnet100":
        assert len(ours) == 925


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100"])
def test_architecture_matches_reference_outputs_under_deterministic_fill(name):
    golden = np.load(shared_path("golden", "architecture_fill", "fill_outputs.npz"))[name]
    bgr = cv2.imread(str(shared_path("images", "group", "Tom_Hanks_54745.png")))
    x = (bgr[:, :, ::-1].astype(np.float32) / 255 - 0.5) / 0.5
    batch = torch.from_numpy(np.stack([x, x[:, ::-1]]).transpose(0, 3, 1, 2).copy())
    model = fill_deterministic(create_model(name)).eval()
    with torch.inference_mode():
        out = model(batch).numpy()
    assert out.shape == golden.shape == (2, 512)
    assert np.abs(out - golden).max() <= 1e-4 * np.abs(golden).max()


def test_registry_contract():
    assert {f"iresnet{d}" for d in (18, 34, 50, 100, 200)} <= set(list_models("embedder"))
    config = get_config("iresnet100")
    assert (config.input_format, config.mean, config.std) == ("RGB", (127.5,) * 3, (127.5,) * 3)
    assert config.input_size == (112, 112) and config.embedding_size == 512
    assert config.default_weights is None


def test_block_counts():
    model = IResNet(LAYERS["iresnet200"])
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [6, 26, 60, 6]


def _random_iresnet18() -> IResNet:
    torch.manual_seed(0)
    model = IResNet(LAYERS["iresnet18"])
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                tensor.normal_(0, 0.1)
    return model.eval()


def _embed(model: torch.nn.Module) -> np.ndarray:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        return model.eval()(x).numpy()


@pytest.mark.parametrize("layout", ["backbone.pth", "module_prefixed.pth", "training_checkpoint.pt"])
def test_loads_checkpoints_in_arcface_torch_formats(tmp_path, layout):
    source = _random_iresnet18()
    state = source.state_dict()
    if layout == "module_prefixed.pth":  # saved from DistributedDataParallel
        state = {f"module.{k}": v for k, v in state.items()}
    if layout == "training_checkpoint.pt":  # arcface_torch checkpoint_gpu_0.pt
        state = {"epoch": 3, "global_step": 1000, "state_dict_backbone": state, "state_dict_softmax_fc": {}}
    torch.save(state, tmp_path / layout)
    loaded = create_model("iresnet18", weights=tmp_path / layout)
    np.testing.assert_array_equal(_embed(loaded), _embed(source))


def test_wrong_depth_gives_clear_mismatch_error(tmp_path):
    torch.save(_random_iresnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError) as info:
        load_iresnet_weights(IResNet(LAYERS["iresnet34"]), tmp_path / "r18.pth")
    message = str(info.value)
    assert "missing keys" in message and "layer1.2.bn1.weight" in message


def test_refuses_missing_and_non_weight_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create_model("iresnet50", weights=tmp_path / "absent.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_model("iresnet50", weights=tmp_path / "text.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs CUDA")
def test_fp16_autocast_on_cuda_stays_close_to_fp32():
    model = fill_deterministic(create_model("iresnet50")).cuda().eval()
    x = torch.randn(4, 3, 112, 112, device="cuda")
    with torch.inference_mode():
        ref = model(x)
        model.fp16 = True
        half = model(x)
    assert half.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(ref, half)
    assert cosine.min().item() > 0.999
