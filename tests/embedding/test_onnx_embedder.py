import numpy as np
import onnx
import pytest

from facepipe.embedding import create_embedder
from facepipe.embedding.onnx_embedder import OnnxEmbedder, export_onnx, graph_normalises_input
from facepipe.embedding.torch_embedder import TorchEmbedder
from facepipe.models.registry import create_model, get_config
from tests.conftest import shared_path
from tests.models.architecture_fill import fill_deterministic


@pytest.fixture(scope="module")
def iresnet18():
    return fill_deterministic(create_model("iresnet18")).eval()


@pytest.fixture(scope="module")
def exported(iresnet18, tmp_path_factory):
    """Our iresnet18 exported once per convention: insightface (runtime normalises) and mxnet (Sub, Mul in graph)."""
    folder = tmp_path_factory.mktemp("onnx")
    return {
        in_graph: export_onnx(iresnet18, get_config("iresnet18"), folder / f"r18_{in_graph}.onnx", normalise_in_graph=in_graph)
        for in_graph in (False, True)
    }


@pytest.fixture(scope="module")
def crops():
    return np.random.default_rng(1).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)


@pytest.mark.parametrize("in_graph", [False, True], ids=["insightface", "mxnet_sub_mul"])
def test_exported_iresnet_runs_in_onnxruntime_with_the_right_normalisation(exported, iresnet18, crops, in_graph):
    path = exported[in_graph]
    assert graph_normalises_input(onnx.load(str(path))) is in_graph
    embedder = create_embedder("onnx", weights=str(path), threads=1)
    expected_mean, expected_std = (0.0, 1.0) if in_graph else (127.5, 127.5)
    assert embedder.config.mean == (expected_mean,) * 3 and embedder.config.std == (expected_std,) * 3
    assert embedder.input_name == "input.1" and embedder.config.input_size == (112, 112)
    assert embedder.embedding_size == 512 and embedder.fixed_batch is None
    reference = TorchEmbedder(iresnet18, get_config("iresnet18"), channels_last=False, fuse_bn=False).embed(crops, flip=True)
    ours = embedder.embed(crops, flip=True)
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


def test_explicit_normalisation_overrides_the_graph_rule(exported, crops):
    path = exported[True]
    embedder = OnnxEmbedder(path, threads=1, mean=127.5, std=127.5, input_format="BGR")
    assert embedder.config.mean == (127.5,) * 3 and embedder.config.input_format == "BGR"
    # Normalising twice and swapping colours must give other numbers than the right convention.
    right = OnnxEmbedder(path, threads=1).embed(crops[:1], flip=False)
    assert not np.allclose(embedder.embed(crops[:1], flip=False), right, rtol=1e-2)


def test_fixed_batch_model_is_made_dynamic_and_agrees_with_one_at_a_time():
    path = shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")
    embedder = create_embedder("onnx", weights=str(path), preset="faceplugin", threads=1)
    assert (embedder.config.mean, embedder.config.std, embedder.config.input_format) == ((127.0,) * 3, (128.0,) * 3, "RGB")
    assert embedder.fixed_batch is None and embedder.embedding_size == 512
    crops = np.random.default_rng(2).integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8)
    batched = embedder.embed(crops, flip=False)
    single = np.concatenate([embedder.embed(c[None], flip=False) for c in crops])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="needs --weights"):
        create_embedder("onnx")
    with pytest.raises(FileNotFoundError):
        create_embedder("onnx", weights=str(tmp_path / "absent.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(ValueError, match="cannot read ONNX"):
        create_embedder("onnx", weights=str(tmp_path / "junk.onnx"))
    path = shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")
    with pytest.raises(ValueError, match="unknown ONNX preset"):
        create_embedder("onnx", weights=str(path), preset="nope")
