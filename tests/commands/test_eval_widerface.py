"""``facepipe eval widerface``: detect into a prediction folder, reuse it, report json, clear errors."""

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

KEYS = (  # small images, different events
    "12--Group/12_Group_Group_12_Group_Group_12_28",
    "13--Interview/13_Interview_Interview_Sequences_13_134",
    "29--Students_Schoolkids/29_Students_Schoolkids_Students_Schoolkids_29_761",
    "61--Street_Battle/61_Street_Battle_streetfight_61_767",
)


@pytest.fixture
def wider_subset(tmp_path: Path) -> Path:
    """A WIDER-layout folder linking four of the shared val images."""
    root = tmp_path / "images"
    source = shared_path("widerface", "val_images")
    for key in KEYS:
        if not (source / f"{key}.jpg").is_file():
            pytest.skip(f"{key} not among the shared images")
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source / f"{key}.jpg", root / f"{key}.jpg")
    return root


def _invoke(*args: str):
    return CliRunner().invoke(main, ["eval", "widerface", *args])


def test_detects_writes_predictions_and_reports(tmp_path, wider_subset):
    gt_dir, predictions, report = shared_path("widerface"), tmp_path / "pred", tmp_path / "report.json"
    result = _invoke("--images", str(wider_subset), "--gt", str(gt_dir), "--predictions", str(predictions), "--out", str(report))
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["images"] == 4 and data["detector"] == "retinaface" and data["scale"] == "original"
    assert sorted(W.read_predictions(predictions)) == sorted(KEYS)

    # the same numbers as the reference detections of these four images, evaluated on their own
    golden = np.load(shared_path("golden", "retinaface_mnet_shared.npz"))
    reference = W.evaluate(
        {k: W.faces_to_rows(faces_from_rows(golden[f"widerface/val_images/{k}.jpg"])) for k in KEYS},
        W.load_ground_truth(gt_dir),
    )
    for setting in W.SETTINGS:
        assert data[setting] == pytest.approx(reference.ap[setting], abs=5e-4)
    assert data["count_face"] == reference.count_face
    assert "easy" in result.output and "hard" in result.output

    # second run: every file exists, so nothing is detected (a detector would fail loudly here)
    again = _invoke(
        "--images", str(wider_subset), "--gt", str(gt_dir), "--predictions", str(predictions),
        "--out", str(tmp_path / "again.json"), "--detector-weights", str(tmp_path / "no_such_weights.pth"),
    )
    assert again.exit_code == 0, again.output
    assert "evaluating them" in again.output
    again_report = json.loads((tmp_path / "again.json").read_text())
    assert again_report["hard"] == data["hard"] and again_report["detector"] == "retinaface"  # from the folder

    # predictions only (no images): the images with a file are evaluated
    only = _invoke(
        "--gt", str(gt_dir), "--predictions", str(predictions), "--out", str(tmp_path / "only.json"),
        "--plot", str(tmp_path / "pr.png"),
    )
    assert only.exit_code == 0, only.output
    assert json.loads((tmp_path / "only.json").read_text())["hard"] == data["hard"]
    assert (tmp_path / "pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_to_mix_settings_or_foreign_files(tmp_path, wider_subset):
    gt_dir, predictions = shared_path("widerface"), tmp_path / "pred"
    W.write_prediction_file(W.prediction_path(predictions, KEYS[0]), np.zeros((0, 5)))
    foreign = _invoke("--images", str(wider_subset), "--gt", str(gt_dir), "--predictions", str(predictions), "--out", str(tmp_path / "r.json"))
    assert foreign.exit_code == 2 and "unknown origin" in foreign.output

    (predictions / "facepipe_run.json").write_text(json.dumps({"detector": "retinaface", "weights": None, "scale": "fixed"}))
    mixed = _invoke("--images", str(wider_subset), "--gt", str(gt_dir), "--predictions", str(predictions), "--out", str(tmp_path / "r.json"))
    assert mixed.exit_code == 2 and "'scale': 'fixed'" in mixed.output
    assert not (tmp_path / "r.json").exists()


def test_unsupported_settings_fail_before_claiming_the_folder(tmp_path, wider_subset):
    predictions = tmp_path / "pred"
    result = _invoke(
        "--images", str(wider_subset), "--gt", str(shared_path("widerface")), "--predictions", str(predictions),
        "--out", str(tmp_path / "r.json"), "--detector", "mtcnn", "--scale", "fixed",
    )
    assert result.exit_code == 2 and "only available for the RetinaFace" in result.output
    assert not (predictions / "facepipe_run.json").exists()


def test_clear_errors_for_bad_inputs(tmp_path, wider_subset):
    gt_dir = shared_path("widerface")
    stray = wider_subset / "12--Group" / "holiday.jpg"
    stray.write_bytes(b"")
    result = _invoke("--images", str(wider_subset), "--gt", str(gt_dir), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 2 and "12--Group/holiday" in result.output and "not WIDER val images" in result.output
    stray.unlink()

    result = _invoke("--images", str(wider_subset), "--gt", str(tmp_path), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 2 and "wider_face_val.mat" in result.output

    result = _invoke("--gt", str(gt_dir), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 2 and "--predictions" in result.output

    # a WIDER image that cannot be decoded stops the evaluation (a silent skip would bias the AP)
    target = wider_subset / f"{KEYS[1]}.jpg"
    target.unlink()
    target.write_bytes(b"not a jpeg")
    result = _invoke("--images", str(wider_subset), "--gt", str(gt_dir), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 1 and "cannot read" in result.output and KEYS[1].split("/")[1] in result.output
    assert not (tmp_path / "r.json").exists()
