"""SCRFD through the commands: detect (file, model pack, bad graph), align, eval widerface / cfp / compare-detectors / ijbc."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation import widerface as W
from facepipe.types import faces_from_rows
from tests.conftest import shared_path

GOLDEN_PREFIX = "widerface/val_images/"


@pytest.fixture(scope="module")
def weights() -> str:
    return str(shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx"))


@pytest.fixture(scope="module")
def golden_t002():
    return np.load(shared_path("golden", "scrfd_2.5g_shared_t002.npz"))


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def wider_folder(root: Path, keys: list[str]) -> Path:
    source = shared_path("widerface", "val_images")
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source / f"{key}.jpg", root / f"{key}.jpg")
    return root


def test_detect_with_scrfd_weights_and_with_a_pack(tmp_path, weights):
    t1 = shared_path("images", "group", "t1.jpg")
    golden = np.load(shared_path("golden", "scrfd_2.5g_shared_t050.npz"))["images/group/t1.jpg"]
    out = tmp_path / "faces.jsonl"
    result = invoke("detect", str(t1), "--out", str(out), "--detector", "scrfd", "--weights", weights, "--threads", "1")
    assert result.exit_code == 0, result.output
    faces = json.loads(out.read_text())["faces"]
    assert len(faces) == len(golden) == 6
    np.testing.assert_allclose([f["box"] for f in faces], golden[:, :4], atol=1e-3)
    np.testing.assert_allclose([f["landmarks"] for f in faces], golden[:, 5:].reshape(-1, 5, 2), atol=1e-3)

    pack = tmp_path / "antelope"
    pack.mkdir()
    (pack / "scrfd_10g_bnkps.onnx").symlink_to(weights)
    (pack / "glintr100.onnx").symlink_to(shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx"))
    (pack / "1k3d68.onnx").symlink_to(shared_path("weights", "retinaface", "retinaface_mnet025_tiny.onnx"))
    packed = tmp_path / "packed.jsonl"
    result = invoke("detect", str(t1), "--out", str(packed), "--pack", str(pack), "--threads", "1", "--threshold", "0.7")
    assert result.exit_code == 0, result.output
    assert "ignoring 1k3d68.onnx" in result.output
    assert json.loads(packed.read_text())["faces"] == [f for f in faces if f["score"] >= 0.7]


def test_a_graph_that_is_not_scrfd_is_one_clear_line(tmp_path):
    out = tmp_path / "faces.jsonl"
    recognition = shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")
    result = invoke("detect", str(shared_path("images", "group", "t1.jpg")), "--out", str(out), "--detector", "scrfd",
                    "--weights", str(recognition))
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a SCRFD graph" in lines[0] and "1x3x112x112" in lines[0].replace("?", "1")
    assert not out.exists()
    empty = tmp_path / "empty_pack"
    empty.mkdir()
    result = invoke("detect", str(shared_path("images", "group", "t1.jpg")), "--out", str(out), "--pack", str(empty))
    assert result.exit_code == 1 and "has no SCRFD detector" in result.output


def test_align_with_scrfd_honours_min_score(tmp_path, weights):
    images = tmp_path / "in"
    images.mkdir()
    (images / "t1.jpg").symlink_to(shared_path("images", "group", "t1.jpg"))
    (images / "mask.jpg").symlink_to(shared_path("images", "group", "mask_white.jpg"))
    out = tmp_path / "out"
    result = invoke("align", str(images), "--out", str(out), "--detector", "scrfd", "--detector-weights", weights,
                    "--keep", "all", "--min-score", "0.05", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    import pandas as pd

    manifest = pd.read_parquet(out / "manifest.parquet").set_index("key")
    assert manifest.loc["mask.jpg", "status"] == "no_face" and manifest.loc["t1.jpg", "status"] == "ok"
    # SCRFD's own threshold (0.5) gives 6 faces here: --min-score 0.05 must reach the detector (9 faces above it)
    scores = np.asarray(manifest.loc["t1.jpg", "scores"])
    assert len(scores) == 9 and scores.min() >= 0.05
    assert len(manifest.loc["t1.jpg", "outputs"]) == 9


def test_scrfd_wider_writer_reproduces_the_golden_ap():
    ground_truth = W.load_ground_truth(shared_path("widerface"))
    expected = json.loads(shared_path("golden", "wider_ap_scrfd_shared.json").read_text())
    golden = np.load(shared_path("golden", "scrfd_2.5g_shared_t002.npz"))
    predictions = {
        W.image_key(k): W.faces_to_rows(faces_from_rows(golden[k]), plus_one=True) for k in golden.files if k.startswith(GOLDEN_PREFIX)
    }
    result = W.evaluate(predictions, ground_truth)
    for setting in W.SETTINGS:
        assert result.ap[setting] == pytest.approx(expected[setting], abs=1e-9)


def test_eval_widerface_with_scrfd_writes_the_reference_rows(tmp_path, weights, golden_t002):
    keys = sorted(k[len(GOLDEN_PREFIX):-4] for k in golden_t002.files if k.startswith(GOLDEN_PREFIX))[::80]
    images = wider_folder(tmp_path / "images", keys)
    predictions, report = tmp_path / "pred", tmp_path / "report.json"
    result = invoke("eval", "widerface", "--images", str(images), "--gt", str(shared_path("widerface")), "--predictions",
                    str(predictions), "--out", str(report), "--detector", "scrfd", "--detector-weights", weights,
                    "--batch-size", "4", "--threads", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["detector"] == "scrfd" and data["scale"] == "letterbox" and data["images"] == len(keys)
    written = W.read_predictions(predictions)
    for key in keys:
        expected = W.faces_to_rows(faces_from_rows(golden_t002[f"{GOLDEN_PREFIX}{key}.jpg"]), plus_one=True)
        np.testing.assert_array_equal(written[key], expected)
    result = invoke("eval", "widerface", "--images", str(images), "--gt", str(shared_path("widerface")),
                    "--out", str(report), "--detector", "scrfd", "--detector-weights", weights, "--scale", "multiscale")
    assert result.exit_code == 2 and "SCRFD takes original or fixed" in result.output


@pytest.mark.slow
def test_eval_widerface_ap_with_scrfd_equals_insightface_on_the_shared_subset(tmp_path, weights):
    expected = json.loads(shared_path("golden", "wider_ap_scrfd_shared.json").read_text())
    report = tmp_path / "report.json"
    result = invoke("eval", "widerface", "--images", str(shared_path("widerface", "val_images")), "--gt",
                    str(shared_path("widerface")), "--out", str(report), "--detector", "scrfd",
                    "--detector-weights", weights, "--batch-size", "16")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["images"] == expected["n_images"] == 323
    for setting in ("easy", "medium", "hard"):
        assert data[setting] == pytest.approx(expected[setting], abs=1e-4)


@pytest.mark.slow
def test_compare_detectors_has_a_scrfd_row(tmp_path, weights):
    cfp_root = shared_path("cfp", "cfp-dataset")
    out = tmp_path / "table.md"
    result = invoke("eval", "compare-detectors", "--cfp", str(cfp_root), "--splits", "1", "--limit", "6",
                    "--detectors", f"retinaface,scrfd={weights}", "--model", "mobilefacenet",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(out.with_suffix(".json").read_text())
    assert [row["detector"] for row in data["rows"]] == ["retinaface", "scrfd"]
    assert "| SCRFD + mobilefacenet | " in out.read_text()
    for cell in data["rows"][1]["results"].values():  # 6 pairs: the 10-fold accuracy itself means little here
        assert cell["n_pairs"] == 6 and 0.0 <= cell["acc"] <= 1.0
        assert cell["images"]["fallback"] == 0  # SCRFD found a face on every image


@pytest.mark.slow
def test_eval_cfp_and_ijbc_run_with_scrfd(tmp_path, weights):
    from facepipe.detection.base import create_detector
    from facepipe.evaluation.ijbc_mini import build_mini_ijbc

    cfp_root = shared_path("cfp", "cfp-dataset")
    out = tmp_path / "cfp.json"
    result = invoke("eval", "cfp", "--root", str(cfp_root), "--protocol", "FF", "--splits", "1", "--limit", "6",
                    "--detector", "scrfd", "--detector-weights", weights, "--model", "mobilefacenet",
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["FF"]["n_pairs"] == 6 and report["FF"]["images"]["fallback"] == 0

    root = tmp_path / "mini" / "IJBC"
    build_mini_ijbc(cfp_root, root, create_detector("retinaface"), num_subjects=4, seed=3, progress=False)
    result = invoke("eval", "ijbc", str(root), "-o", str(tmp_path / "ijbc"), "--detector", "scrfd",
                    "--detector-weights", weights, "--threads", "1")
    assert result.exit_code == 0, result.output
    assert "+scrfd" in result.output
