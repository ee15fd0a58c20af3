"""The raw-image feature cache is keyed on content: a replaced image is computed again, and reported."""

import os
import shutil

import numpy as np
import pytest

from facepipe.detection.base import create_detector
from facepipe.embedding.base import create_embedder
from facepipe.evaluation.raw_pipeline import FeatureCache, PipelineSpec, extract_features, feature_summary
from facepipe.io.images import read_image
from tests.conftest import shared_path
from tests.evaluation.test_raw_pipeline import CountingDetector


@pytest.fixture(scope="module")
def models():
    return create_detector("retinaface"), create_embedder("mobilefacenet")


def test_replaced_image_is_recomputed_and_reported(tmp_path, models):
    detector, embedder = models
    sources = sorted(shared_path("cfp", "cfp-dataset", "Data", "Images").glob("00[12]/frontal/0[12].jpg"))
    folder = tmp_path / "cfp_like"
    folder.mkdir()
    keys = []
    for i, source in enumerate(sources[:3]):
        shutil.copy(source, folder / f"{i}.jpg")
        keys.append(str(folder / f"{i}.jpg"))
    spec = PipelineSpec("retinaface", None, "mobilefacenet", None)
    counting = CountingDetector(detector)
    first = extract_features(keys, read_image, counting, embedder, spec, cache_dir=tmp_path / "cache", progress=False)
    assert counting.seen == 3 and first.reused == 0 and feature_summary(first)["computed"] == 3

    # Touching a file (new mtime, same bytes) keeps its features; replacing its bytes does not.
    os.utime(keys[0], (1, 1))
    shutil.copy(sources[3], keys[1])
    counting.seen = 0
    second = extract_features(keys, read_image, counting, embedder, spec, cache_dir=tmp_path / "cache", progress=False)
    assert counting.seen == 1 and second.reused == 2
    assert feature_summary(second)["reused"] == 2 and feature_summary(second)["computed"] == 1
    np.testing.assert_array_equal(second.embedding[[0, 2]], first.embedding[[0, 2]])
    fresh = extract_features([str(sources[3])], read_image, detector, embedder, spec, progress=False)
    np.testing.assert_allclose(second.embedding[1], fresh.embedding[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(second.embedding[1], first.embedding[1], atol=1e-2)
    # The cache file holds one row per key (the stale row was replaced, not duplicated).
    cache = FeatureCache(tmp_path / "cache", spec)
    assert sorted(cache.features.keys) == sorted(keys)
    assert cache.lookup(keys)[1] == []
