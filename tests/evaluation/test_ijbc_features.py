"""The IJB-C feature job (a BatchJob) on the local engine: shards, resume, engine failures, content keys."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from facepipe.engine.local import run_job
from facepipe.evaluation.ijbc_features import (
    FLAG_FAILED,
    FLAG_OK,
    FLAG_UNREADABLE,
    FeatureCache,
    FeatureCacheError,
    FeatureExtractor,
    IJBFeatureJob,
    extract_batch,
)
from facepipe.evaluation.ijbc_layout import IJBLayout
from tests.evaluation.test_ijbc import FlipSensitiveEmbedder

LANDMARKS = np.array([[40, 50], [90, 50], [65, 75], [45, 100], [85, 100]], np.float32)


def small_layout(root, n=7) -> IJBLayout:
    (root / "loose_crop").mkdir(parents=True)
    rng = np.random.default_rng(4)
    names = []
    for i in range(n):
        name = f"{i}.png"
        if i == 3:
            (root / "loose_crop" / name).write_bytes(b"broken")
        else:
            cv2.imwrite(str(root / "loose_crop" / name), rng.integers(0, 255, (150, 130, 3), dtype=np.uint8))
        names.append(name)
    landmarks = np.repeat(LANDMARKS[None], n, axis=0) + rng.uniform(-3, 3, (n, 5, 2)).astype(np.float32)
    return IJBLayout(root, "IJBC", np.array(names, dtype=object), np.arange(n), np.arange(n), landmarks,
                     rng.uniform(0.5, 1, n).astype(np.float32), np.array([0]), np.array([1]), np.array([1], np.int8))


def extractor_with(embedder) -> FeatureExtractor:
    extractor = FeatureExtractor(model="halves")
    extractor._models = (embedder, None)  # a real (pixel-statistics) embedder instead of a network
    return extractor


def test_job_fills_shards_resumes_and_equals_extract_batch(tmp_path):
    layout = small_layout(tmp_path / "ijb")
    extractor = extractor_with(FlipSensitiveEmbedder())
    key = {"test": "job"}
    cache = FeatureCache(tmp_path / "cache", key, layout.num_images, shard_size=3)
    job = IJBFeatureJob(layout, cache, extractor, batch_size=2)
    with pytest.warns(UserWarning, match="3.png unreadable"):
        assert run_job(job, "local", progress=False) is cache
    assert cache.complete and (job.extracted, job.reused) == (7, 0)
    with pytest.warns(UserWarning):
        expected = extract_batch(layout.image_paths(0, 7), layout.landmarks, layout.faceness, FlipSensitiveEmbedder())
    features = np.concatenate([f for _, f, _, _ in cache.iter_shards()])
    np.testing.assert_array_equal(features, expected["features"])
    assert list(cache.flags()) == [FLAG_OK] * 3 + [FLAG_UNREADABLE] + [FLAG_OK] * 3

    (cache.directory / "features_000002.npy").unlink()  # a lost output: that shard alone is redone
    job = IJBFeatureJob(layout, FeatureCache(tmp_path / "cache", key, 7), extractor, batch_size=2)
    run_job(job, "local", progress=False)
    assert (job.extracted, job.reused) == (1, 6)
    np.testing.assert_array_equal(np.concatenate([f for _, f, _, _ in cache.iter_shards()]), features)
    with pytest.raises(FeatureCacheError, match="was made for other features"):
        FeatureCache(tmp_path / "cache", {"test": "other"}, 7)


def test_failed_batch_is_recorded_not_lost(tmp_path):
    layout = small_layout(tmp_path / "ijb", n=4)
    job = IJBFeatureJob(layout, FeatureCache(tmp_path / "cache", {"k": 1}, 4, shard_size=4), extractor_with(FlipSensitiveEmbedder()), 2)
    units = job.pending()
    worker = pickle.loads(pickle.dumps(job.worker()))  # picklable, models dropped
    assert worker.extractor._models is None
    with pytest.warns(UserWarning, match="failed \\(worker died\\)"):
        failed = job.failed(units[0].batches[1], "worker died")
    ok = job.worker()(units[0].batches[0])
    job.commit(units[0], [ok, failed])
    job.finish()
    _, features, scores, flags = next(job.cache.iter_shards())
    assert list(flags) == [FLAG_OK, FLAG_OK, FLAG_FAILED, FLAG_FAILED]
    assert not features[2:].any() and features[:2].any()
    np.testing.assert_allclose(scores[2:], layout.faceness[2:])


def test_cache_key_follows_content(tmp_path):
    layout = small_layout(tmp_path / "ijb", n=3)
    extractor = FeatureExtractor(model="mobilefacenet")
    key = extractor.cache_key(layout)
    assert key == extractor.cache_key(layout)
    edited = IJBLayout(**{**layout.__dict__, "landmarks": layout.landmarks + np.float32(0.01)})
    rescored = IJBLayout(**{**layout.__dict__, "faceness": layout.faceness * 0.5})
    assert extractor.cache_key(edited)["landmarks"] != key["landmarks"]
    assert extractor.cache_key(rescored)["landmarks"] != key["landmarks"]
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"one")
    first = FeatureExtractor(weights=str(weights)).cache_key(layout)["weights"]
    weights.write_bytes(b"two")  # same path, new content
    assert FeatureExtractor(weights=str(weights)).cache_key(layout)["weights"] != first
    reduced = FeatureExtractor(model="mobilefacenet", precision="bf16").cache_key(layout)
    assert reduced["model"] == "mobilefacenet@bf16" and reduced != key  # bf16 features never mix with fp32 ones


def test_a_cache_in_use_is_refused_with_its_holder(tmp_path):
    cache = FeatureCache(tmp_path / "cache", {"k": 1}, 4)
    cache.lock()
    try:
        with pytest.raises(FeatureCacheError, match=r"in use by pid \d+") as refused:
            FeatureCache(tmp_path / "cache", {"k": 1}, 4)
        assert "was made for" not in str(refused.value)
    finally:
        cache.close()
    FeatureCache(tmp_path / "cache", {"k": 1}, 4)  # released: opens again


def test_an_unreadable_manifest_is_one_clear_error(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.json").write_text("{not json")
    with pytest.raises(FeatureCacheError, match="manifest.json is unreadable"):
        FeatureCache(tmp_path / "cache", {"k": 1}, 4)
