"""``facepipe eval ijbc`` end to end on a mini IJB-C built from the real CFP images, checked against loops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation import ijbc, ijbc_features, ijbc_layout, metrics
from facepipe.evaluation.ijbc_mini import build_mini_ijbc
from tests.conftest import shared_path
from tests.evaluation.test_ijbc import brute_force_roc, loop_template_features, nearest_tar

pytestmark = pytest.mark.shared

NUM_SUBJECTS = 8


@pytest.fixture(scope="module")
def mini_ijbc(tmp_path_factory) -> Path:
    from facepipe.detection.base import create_detector

    cfp = shared_path("cfp", "cfp-dataset")
    root = tmp_path_factory.mktemp("mini") / "IJBC"
    stats = build_mini_ijbc(cfp, root, create_detector("retinaface"), num_subjects=NUM_SUBJECTS, seed=3, progress=False)
    assert stats.undetected_images == 0 and stats.images == 14 * NUM_SUBJECTS
    assert (stats.templates, stats.pairs, stats.genuine_pairs) == (3 * NUM_SUBJECTS, 2 * NUM_SUBJECTS**2, 2 * NUM_SUBJECTS)
    return root


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(main, ["eval", "ijbc", *args, "--threads", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def independent_tars(layout: ijbc_layout.IJBLayout, cache: ijbc_features.FeatureCache, config: ijbc.ScoreConfig):
    feats = np.concatenate([f for _, f, _, _ in cache.iter_shards()])
    scores = np.concatenate([s for _, _, s, _ in cache.iter_shards()])
    template_feats, unique_templates = loop_template_features(feats, scores, layout.templates, layout.medias, config)
    row = {t: i for i, t in enumerate(unique_templates)}
    pair_scores = np.array([template_feats[row[a]] @ template_feats[row[b]] for a, b in zip(layout.pair_t1, layout.pair_t2)])
    fpr, tpr, _ = brute_force_roc(layout.labels.astype(int), pair_scores)
    return {metrics.far_key(x): float(nearest_tar(fpr, tpr, x)) for x in metrics.FAR_LEVELS}, pair_scores


def caches(output: Path) -> dict[str, ijbc_features.FeatureCache]:
    found = {}
    for manifest in sorted((output / "feature_cache").glob("*/manifest.json")):
        stored = json.loads(manifest.read_text())
        found[stored["key"]["detector"]] = ijbc_features.FeatureCache(manifest.parent, stored["key"], stored["num_images"])
    return found


def test_cli_switches_and_detector_comparison_match_loops(mini_ijbc, tmp_path):
    output = tmp_path / "out"
    stdout = run_cli(str(mini_ijbc), "-o", str(output), "--configs", "all", "--detector", "given", "--detector", "retinaface", "--detector-pad", "0", "--shard-size", "40", "--batch-size", "16")
    layout = ijbc_layout.read_ijb_layout(mini_ijbc)
    results = json.loads((output / "tar_far.json").read_text())
    assert len(results) == 16 and stdout.splitlines()[0] == "| Methods | 1e-06 | 1e-05 | 0.0001 | 0.001 | 0.01 | 0.1 |"
    assert (output / "roc.png").read_bytes()[:4] == b"\x89PNG"
    found = caches(output)
    assert set(found) == {"given", "retinaface"} and all(c.num_shards == 3 for c in found.values())

    by_name = {f"{r['config']['method']} {r['config']['code']}": r for r in results}
    for detector, method in (("given", "mobilefacenet"), ("retinaface", "mobilefacenet+retinaface")):
        for config in ijbc.parse_configs("all"):
            result = by_name[f"{method} {config.code}"]
            expected, loop_scores = independent_tars(layout, found[detector], config)
            assert result["TAR@FAR"] == expected
            saved = np.load(output / "scores" / f"{method.replace('+', '_')}_{config.code}.npy")
            np.testing.assert_allclose(saved, loop_scores, atol=1e-6)
            assert result["config"]["pairs"] == len(layout.labels) and result["config"]["detector"] == detector
            # Mobilefacenet on frontal/profile CFP templates separates genuine from impostor pairs well.
            assert loop_scores[layout.labels == 1].mean() > loop_scores[layout.labels == 0].mean() + 0.3
        line = next(l for l in stdout.splitlines() if l.startswith(f"| {method} N1D1F1 |"))
        tars = by_name[f"{method} N1D1F1"]["TAR@FAR"]
        assert line == f"| {method} N1D1F1 | " + " | ".join(f"{tars[metrics.far_key(x)] * 100:.2f}" for x in metrics.FAR_LEVELS) + " |"

    # The given five points came from the same RetinaFace on the unpadded crops, so re-detection without a border
    # finds the same face: same points (to the 2 decimals stored), same scores (6 decimals), features equal to noise.
    given = np.concatenate([f for _, f, _, _ in found["given"].iter_shards()])
    redetected = np.concatenate([f for _, f, _, _ in found["retinaface"].iter_shards()])
    assert not found["retinaface"].flags().any()
    cosine = np.sum(given * redetected, -1) / np.linalg.norm(given, axis=-1) / np.linalg.norm(redetected, axis=-1)
    assert cosine.min() > 0.99
    redetected_scores = np.concatenate([s for _, _, s, _ in found["retinaface"].iter_shards()])
    np.testing.assert_allclose(redetected_scores, layout.faceness, atol=2e-5)


def test_cached_features_are_the_aligned_flip_embeddings(mini_ijbc, tmp_path):
    from facepipe.alignment import norm_crop
    from facepipe.embedding.base import create_embedder
    from facepipe.io.images import read_image

    output = tmp_path / "out"
    run_cli(str(mini_ijbc), "-o", str(output), "--shard-size", "40")
    layout = ijbc_layout.read_ijb_layout(mini_ijbc)
    cache = caches(output)["given"]
    feats = np.concatenate([f for _, f, _, _ in cache.iter_shards()])
    embedder = create_embedder("mobilefacenet")
    picks = [0, 41, 111]
    crops = np.stack([norm_crop(read_image(layout.image_paths(i, i + 1)[0]), layout.landmarks[i], 112) for i in picks])
    np.testing.assert_allclose(feats[picks, 0], embedder.embed(crops, flip=False), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[picks, 1], embedder.embed(crops[:, :, ::-1], flip=False), rtol=1e-4, atol=1e-4)

    # Re-evaluating other switches reads the cache only; a deleted shard is re-extracted, results unchanged.
    first = json.loads((output / "tar_far.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in cache.directory.glob("*.npy")}
    run_cli(str(mini_ijbc), "-o", str(output), "--shard-size", "40", "--no-flip", "--no-detector-score")
    assert {p: p.stat().st_mtime_ns for p in cache.directory.glob("*.npy")} == stamps
    assert json.loads((output / "tar_far.json").read_text())[0]["config"]["code"] == "N1D0F0"
    (cache.directory / "features_000001.npy").unlink()
    run_cli(str(mini_ijbc), "-o", str(output), "--shard-size", "40")
    restamped = {p: p.stat().st_mtime_ns for p in cache.directory.glob("*.npy")}
    changed = sorted(p.name for p in restamped if restamped[p] != stamps.get(p))
    assert changed == ["features_000001.npy", "flags_000001.npy", "scores_000001.npy"]
    again = json.loads((output / "tar_far.json").read_text())
    assert again[0]["TAR@FAR"] == first[0]["TAR@FAR"]


def test_cli_errors(mini_ijbc, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["eval", "ijbc", str(mini_ijbc), "-o", str(tmp_path), "--configs", "N1X1F1"])
    assert bad.exit_code != 0 and "bad configuration" in bad.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = runner.invoke(main, ["eval", "ijbc", str(empty), "-o", str(tmp_path)])
    assert missing.exit_code != 0 and "ijbc_face_tid_mid.txt" in missing.output
    wrong_target = runner.invoke(main, ["eval", "ijbc", str(mini_ijbc), "-o", str(tmp_path), "--target", "IJBB"])
    assert wrong_target.exit_code != 0 and "ijbb_face_tid_mid.txt" in wrong_target.output
    with pytest.raises(FileExistsError):
        build_mini_ijbc(shared_path("cfp", "cfp-dataset"), mini_ijbc, detector=None)


@pytest.mark.slow
def test_cli_mtcnn_redetection_matches_loops(mini_ijbc, tmp_path):
    output = tmp_path / "out"
    run_cli(str(mini_ijbc), "-o", str(output), "--configs", "N1D1F1,N0D0F1", "--detector", "mtcnn")
    layout = ijbc_layout.read_ijb_layout(mini_ijbc)
    cache = caches(output)["mtcnn"]
    for result in json.loads((output / "tar_far.json").read_text()):
        expected, _ = independent_tars(layout, cache, ijbc.ScoreConfig.parse(result["config"]["code"]))
        assert result["TAR@FAR"] == expected
        assert result["config"]["detector_fallbacks"] == int((cache.flags() == ijbc_features.FLAG_DETECTOR_FALLBACK).sum())
