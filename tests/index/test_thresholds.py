"""Calibrated "same person" thresholds: the math, the stored table, and what ``index search`` prints."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.index.thresholds import all_impostor_scores, calibration_for, threshold_at_far, weights_key
from tests.conftest import shared_path


def test_threshold_at_far_leaves_that_fraction_of_impostors_above() -> None:
    scores = np.random.default_rng(0).normal(size=100_000).astype(np.float32)
    for far in (1e-2, 1e-3, 1e-4):
        t = threshold_at_far(scores, far)
        assert np.count_nonzero(scores > t) == int(far * len(scores))
    with pytest.raises(ValueError):
        threshold_at_far(np.zeros(0), 1e-3)


def test_all_impostor_scores_are_the_different_identity_pairs_once() -> None:
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(7, 4)).astype(np.float32)
    identities = np.array(["a", "a", "b", "b", "b", "c", "d"])
    want = sorted(float(embeddings[i] @ embeddings[j]) for i in range(7) for j in range(i + 1, 7)
                  if identities[i] != identities[j])
    np.testing.assert_allclose(sorted(all_impostor_scores(embeddings, identities, chunk=3)), want, rtol=1e-6)


def test_the_bundled_model_has_cfp_thresholds_with_provenance(tmp_path) -> None:
    calibration = calibration_for("mobilefacenet", None)
    assert calibration is not None
    strict, loose = calibration.thresholds["1e-04"], calibration.thresholds["1e-03"]
    assert 0 < loose < strict < 1 and calibration.tar["1e-04"] < calibration.tar["1e-03"]
    assert {"command", "date", "cpu", "data"} <= set(calibration.provenance)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not the calibrated weights")
    assert weights_key("onnx", other) == "sha256:" + hashlib.sha256(b"not the calibrated weights").hexdigest()
    assert calibration_for("onnx", other) is None
    assert calibration_for("iresnet50", None) is None
    assert calibration_for("onnx", tmp_path / "gone.onnx") is None


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_index_search_says_what_score_means_same_person(tmp_path) -> None:
    photos = tmp_path / "photos" / "someone"
    photos.mkdir(parents=True)
    for name in ("t1.jpg", "mask_white.jpg"):
        shutil.copy(shared_path("images", "group", name), photos / name)
    assert _invoke("align", tmp_path / "photos", "--out", tmp_path / "aligned", "--workers", "0", "--no-progress").exit_code == 0
    assert _invoke("embed", tmp_path / "aligned", "--out", tmp_path / "emb", "--no-progress").exit_code == 0
    gallery = tmp_path / "g.faiss"
    assert _invoke("index", "build", tmp_path / "emb", "--out", gallery, "--no-progress").exit_code == 0

    result = _invoke("index", "search", gallery, tmp_path / "emb", "--k", "1")
    assert result.exit_code == 0, result.output
    expected = calibration_for("mobilefacenet", None)
    assert f"same person if score > {expected.thresholds['1e-03']:.3f} (FAR 1e-03" in result.output
    assert f"or {expected.thresholds['1e-04']:.3f} (FAR 1e-04" in result.output

    sidecar = next(p for p in tmp_path.iterdir() if p.name.startswith("g.faiss") and p.suffix == ".json")
    settings = json.loads(sidecar.read_text())
    uncalibrated = tmp_path / "mine.onnx"
    uncalibrated.write_bytes(b"weights nobody calibrated")
    settings["spec"].update(model="onnx", weights=str(uncalibrated))
    sidecar.write_text(json.dumps(settings))
    result = _invoke("index", "search", gallery, tmp_path / "emb", "--k", "1", "--out", tmp_path / "r.csv")
    assert result.exit_code == 0, result.output
    assert "eval/calibrate_thresholds.py" in result.output


def test_the_shared_faceplugin_onnx_is_recognised_by_its_weights_file() -> None:
    weights = shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")
    calibration = calibration_for("onnx", weights)
    assert calibration is not None and calibration.key.startswith("sha256:")
    assert 0 < calibration.thresholds["1e-03"] < calibration.thresholds["1e-04"] < 1
