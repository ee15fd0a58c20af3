"""``facepipe eval quality`` on real CFP images: curves for every measure, written and ranked."""

from __future__ import annotations

import json

from click.testing import CliRunner

from facepipe.cli import main
from tests.conftest import shared_path


def test_cfp_fp_quality_curves_on_one_split(tmp_path):
    root = shared_path("cfp", "cfp-dataset")
    result = CliRunner().invoke(
        main,
        ["eval", "quality", "--cfp", str(root), "--protocol", "FP", "--splits", "1", "--limit", "40",
         "--threads", "1", "--fmr", "0.05", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "q")],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "evrc.json").read_text())
    names = {c["measure"] for c in report["ranking"]}
    assert names == {"detector_score", "embedding_norm", "inter_ocular", "yaw", "sharpness", "oracle", "random"}
    assert report["pairs"] == 40 and report["protocol"] == "CFP-FP"
    curves = {c["name"]: c for c in report["curves"]}
    assert all(c["fnmr"][0] == report["baseline_fnmr"] for c in curves.values())
    assert curves["oracle"]["area"] <= curves["random"]["area"]
    assert (tmp_path / "q" / "evrc.png").stat().st_size > 10_000
    assert "detector retinaface" in result.output


def test_quality_curves_of_a_bin(tmp_path):
    """A .bin of aligned CFP-FP crops: its crops re-aligned, every measure's curve, pairs (2i, 2i+1)."""
    from facepipe.detection.base import create_detector
    from tests.commands.test_eval_verification import _make_cfp_bin_module

    root = shared_path("cfp", "cfp-dataset")
    bin_path = tmp_path / "cfp_fp_mini.bin"
    _make_cfp_bin_module().build_cfp_bin(root, "FP", bin_path, create_detector("retinaface"), splits=[1], limit=30)
    result = CliRunner().invoke(main, ["eval", "quality", "--bin", str(bin_path), "--fmr", "0.05", "--threads", "1",
                                       "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "evrc.json").read_text())
    assert report["protocol"] == "cfp_fp_mini" and report["pairs"] == 30 and report["faces"] == 60
    assert {c["measure"] for c in report["ranking"]} >= {"embedding_norm", "sharpness", "yaw", "oracle", "random"}
    result = CliRunner().invoke(main, ["eval", "quality", "--bin", str(bin_path), "--cfp", str(root), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "give one protocol" in result.output
