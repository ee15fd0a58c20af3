"""FeatureExtractor's embedder options (what an embedding folder's run.json records, e.g. an ONNX preset): they
reach the embedder and the cache key, and a key without options is the one it always was."""

from __future__ import annotations

from facepipe.evaluation.ijbc_features import FeatureExtractor
from tests.conftest import shared_path
from tests.evaluation.test_ijbc_features import small_layout


def test_options_enter_the_key_only_when_given(tmp_path):
    layout = small_layout(tmp_path / "ijb", n=3)
    plain = FeatureExtractor(model="onnx", weights=None).cache_key(layout)
    assert "options" not in plain
    preset = FeatureExtractor(model="onnx", options={"preset": "faceplugin"}).cache_key(layout)
    assert preset["options"] == {"preset": "faceplugin"} and {k: v for k, v in preset.items() if k != "options"} == plain


def test_options_reach_the_embedder():
    weights = str(shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx"))
    embedder, _ = FeatureExtractor(model="onnx", weights=weights, options={"preset": "faceplugin"}).models()
    assert embedder.embedding_size == 512
    assert embedder.config.mean == (127.0, 127.0, 127.0)  # the faceplugin preset's (x - 127) / 128
