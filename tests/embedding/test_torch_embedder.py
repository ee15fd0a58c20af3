import numpy as np
import pytest
import torch

from facepipe.embedding import Embedder, create_embedder
from facepipe.embedding.torch_embedder import TorchEmbedder, preprocess
from facepipe.models.registry import create_model, get_config


@pytest.fixture(scope="module")
def crops():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mobilefacenet():
    return create_embedder("mobilefacenet", batch_size=4)


def test_preprocess_follows_the_model_contract():
    crop = np.zeros((1, 112, 112, 3), dtype=np.uint8)
    crop[..., 0], crop[..., 1], crop[..., 2] = 10, 20, 250  # B, G, R
    x = preprocess(crop, get_config("iresnet50"))  # RGB, (x - 127.5) / 127.5
    assert x.shape == (1, 3, 112, 112) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], [(250 - 127.5) / 127.5, (20 - 127.5) / 127.5, (10 - 127.5) / 127.5], rtol=1e-6)
    x = preprocess(crop, get_config("mobilefacenet"))  # RGB, (x - 127.5) / 128
    np.testing.assert_allclose(x[0, :, 0, 0], [(250 - 127.5) / 128, (20 - 127.5) / 128, (10 - 127.5) / 128], rtol=1e-6)


def test_bad_crops_are_refused_with_clear_errors(mobilefacenet):
    with pytest.raises(ValueError, match="112x112"):
        mobilefacenet.embed(np.zeros((2, 96, 112, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        mobilefacenet.embed(np.zeros((2, 112, 112, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        mobilefacenet.embed(np.zeros((2, 112, 112), dtype=np.uint8))


def test_flip_is_the_sum_of_image_and_mirror_and_batching_does_not_matter(mobilefacenet, crops):
    assert isinstance(mobilefacenet, Embedder)
    plain = mobilefacenet.embed(crops, flip=False)
    mirrored = mobilefacenet.embed(np.ascontiguousarray(crops[:, :, ::-1]), flip=False)
    flipped = mobilefacenet.embed(crops, flip=True)
    assert flipped.shape == (5, 128) and flipped.dtype == np.float32
    np.testing.assert_allclose(flipped, plain + mirrored, rtol=1e-4, atol=1e-4)
    one_by_one = np.concatenate([mobilefacenet.embed(c[None], flip=True) for c in crops])
    np.testing.assert_allclose(one_by_one, flipped, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.linalg.norm(flipped, axis=1), 1.0)  # raw, not normalised


def test_matches_the_bare_model(crops):
    model = create_model("mobilefacenet").eval()
    x = torch.from_numpy(preprocess(crops, get_config("mobilefacenet")))
    with torch.inference_mode():
        expected = model(x).numpy()
    embedder = TorchEmbedder(create_model("mobilefacenet"), get_config("mobilefacenet"), channels_last=False)
    np.testing.assert_allclose(embedder.embed(crops, flip=False), expected, rtol=1e-4, atol=1e-4)


def test_iresnet_needs_weights_and_loads_them(tmp_path, crops):
    with pytest.raises(ValueError, match="needs weights"):
        create_embedder("iresnet50")
    torch.manual_seed(0)
    source = create_model("iresnet18").eval()
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    embedder = create_embedder("iresnet18", weights=str(tmp_path / "backbone.pth"), batch_size=8, backend="torch")
    assert embedder.embedding_size == 512
    x = torch.from_numpy(preprocess(crops[:2], get_config("iresnet18")))
    with torch.inference_mode():
        expected = source(x).numpy()
    np.testing.assert_allclose(embedder.embed(crops[:2], flip=False), expected, rtol=1e-4, atol=1e-3)


def test_onnxruntime_backend_runs_the_same_weights(crops, tmp_path, monkeypatch):
    monkeypatch.setenv("FACEPIPE_HOME", str(tmp_path))  # the export cache
    on_torch = create_embedder("mobilefacenet", backend="torch")
    on_ort = create_embedder("mobilefacenet", backend="onnxruntime", threads=1)
    assert isinstance(on_torch, TorchEmbedder) and type(on_ort).__name__ == "OnnxEmbedder"
    assert on_ort.name == "mobilefacenet" and on_ort.config.mean == (127.5,) * 3 and on_ort.config.std == (128.0,) * 3
    expected = on_torch.embed(crops, flip=True)
    assert np.abs(on_ort.embed(crops, flip=True) - expected).max() <= 1e-4 * np.abs(expected).max()
    assert len(list((tmp_path / "onnx").glob("mobilefacenet-*.onnx"))) == 1
    again = create_embedder("mobilefacenet", backend="onnxruntime", threads=1)  # reuses the cached export
    assert again.path == on_ort.path
    assert isinstance(create_embedder("mobilefacenet", backend="auto", fp16=False, batch_size=2), Embedder)


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown embedder options: colour"):
        create_embedder("mobilefacenet", colour="rgb")
    with pytest.raises(ValueError, match="CUDA"):
        create_embedder("mobilefacenet", fp16=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        create_embedder("mobilefacenet", backend="tensorrt")
    with pytest.raises(ValueError, match="unknown embedding model"):
        create_embedder("resnet9000")


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
def test_batchnorm_folding_keeps_the_numbers(name, crops):
    model = create_model(name).eval()
    with torch.no_grad():  # non-trivial statistics so that folding is really exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    config = get_config(name)
    folded = TorchEmbedder(model, config, fuse_bn=True)
    plain = TorchEmbedder(model, config, fuse_bn=False, channels_last=False)
    assert folded.fused and not plain.fused
    remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.modules())
    assert remaining < sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    expected = plain.embed(crops, flip=True)
    assert np.abs(folded.embed(crops, flip=True) - expected).max() <= 1e-4 * np.abs(expected).max()
