"""``--pack`` on ``eval widerface`` and ``eval ijbc``: the pack's graphs, found by content, run as if named."""

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
def scrfd_file() -> Path:
    return shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx")


@pytest.fixture(scope="module")
def recognition_file() -> Path:
    return shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")


@pytest.fixture
def pack(tmp_path, scrfd_file, recognition_file) -> Path:
    """An antelopev2-like folder; the names lie, so the graphs must decide."""
    folder = tmp_path / "antelope"
    folder.mkdir()
    (folder / "glintr100.onnx").symlink_to(scrfd_file)
    (folder / "scrfd_10g_bnkps.onnx").symlink_to(recognition_file)
    return folder


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_eval_widerface_with_a_pack_writes_the_reference_rows(tmp_path, pack, scrfd_file):
    golden = np.load(shared_path("golden", "scrfd_2.5g_shared_t002.npz"))
    keys = sorted(k[len(GOLDEN_PREFIX) : -4] for k in golden.files if k.startswith(GOLDEN_PREFIX))[5::120]
    images = tmp_path / "images"
    for key in keys:
        (images / key).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(shared_path("widerface", "val_images") / f"{key}.jpg", images / f"{key}.jpg")
    predictions, report = tmp_path / "pred", tmp_path / "report.json"
    common = ("eval", "widerface", "--images", str(images), "--gt", str(shared_path("widerface")), "--out", str(report))
    result = invoke(*common, "--predictions", str(predictions), "--pack", str(pack), "--batch-size", "2", "--threads", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["detector"] == "scrfd" and data["scale"] == "letterbox" and data["images"] == len(keys)
    assert Path(data["weights"]).resolve() == scrfd_file.resolve()
    written = W.read_predictions(predictions)
    for key in keys:
        expected = W.faces_to_rows(faces_from_rows(golden[f"{GOLDEN_PREFIX}{key}.jpg"]), plus_one=True)
        np.testing.assert_array_equal(written[key], expected)

    result = invoke(*common, "--pack", str(pack), "--detector-weights", str(scrfd_file))
    assert result.exit_code == 2 and "give --pack or detector weights, not both" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(*common, "--pack", str(empty))
    assert result.exit_code == 1 and "Traceback" not in result.output and "has no SCRFD detector" in result.output


@pytest.mark.slow
def test_eval_ijbc_with_a_pack_equals_the_named_files(tmp_path, pack, scrfd_file, recognition_file):
    from facepipe.detection.base import create_detector
    from facepipe.evaluation.ijbc_mini import build_mini_ijbc

    root = tmp_path / "mini" / "IJBC"
    build_mini_ijbc(shared_path("cfp", "cfp-dataset"), root, create_detector("retinaface"), num_subjects=3, seed=5, progress=False)
    output, cache = tmp_path / "out", tmp_path / "cache"
    common = ("eval", "ijbc", str(root), "-o", str(output), "--cache-dir", str(cache), "--threads", "1", "--detector", "given")
    packed = invoke(*common, "--detector", "scrfd", "--pack", str(pack))
    assert packed.exit_code == 0, packed.output
    assert "| onnx N1D1F1 |" in packed.output and "| onnx+scrfd N1D1F1 |" in packed.output
    # The same files named on the command line hit the features the pack run cached: nothing is extracted again.
    named = invoke(*common, "--detector", "scrfd", "--model", "onnx", "--weights", str(recognition_file),
                   "--detector-weights", str(scrfd_file))
    assert named.exit_code == 0, named.output
    assert named.output.count(", 0 extracted") == 2
    table = [line for line in packed.stdout.splitlines() if line.startswith("| onnx")]
    assert table and all(line in named.stdout for line in table)

    recognition_only = invoke(*common, "--pack", str(pack))  # no scrfd asked for: the pack gives only the model
    assert recognition_only.exit_code == 0 and ", 0 extracted" in recognition_only.output
    both = invoke(*common, "--pack", str(pack), "--weights", str(recognition_file))
    assert both.exit_code == 2 and "not both" in both.output
