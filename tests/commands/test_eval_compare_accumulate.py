"""``compare-detectors --out`` accumulates rows per detector and model; every printed block names its detector."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from facepipe.cli import main
from tests.commands.test_eval_verification import _make_cfp_bin_module
from tests.conftest import shared_path

pytestmark = pytest.mark.shared


def test_second_detector_adds_a_row_and_a_rerun_replaces_it(tmp_path):
    from facepipe.detection.base import create_detector

    cfp_root = shared_path("cfp", "cfp-dataset")
    bin_path = tmp_path / "tiny.bin"
    _make_cfp_bin_module().build_cfp_bin(cfp_root, "FF", bin_path, create_detector("retinaface"), splits=[3], limit=4)
    out = tmp_path / "table.md"

    def compare(detectors: str) -> str:
        result = CliRunner().invoke(main, ["eval", "compare-detectors", "--bin", str(bin_path), "--detectors", detectors,
                                           "--cache-dir", str(tmp_path / "cache"), "--out", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    output = compare("retinaface")
    assert "== tiny · detector retinaface · model mobilefacenet ==\n[tiny]XNorm: " in output
    assert "== tiny · released crops (no detector) · model mobilefacenet ==\n[tiny]XNorm: " in output
    first = json.loads(out.with_suffix(".json").read_text())
    output = compare("mtcnn")
    assert "== tiny · detector mtcnn · model mobilefacenet ==" in output and "detector retinaface" not in output
    second = json.loads(out.with_suffix(".json").read_text())
    assert [row["detector"] for row in second["rows"]] == ["mtcnn", None, "retinaface"]
    assert second["rows"][2] == first["rows"][0]  # the retinaface row kept as it was
    lines = out.read_text().splitlines()
    assert lines[0] == "| Method | tiny |" and sum(line.startswith("| ") for line in lines[2:]) == 3

    # A rerun of retinaface with another --pad replaces its own row (now first); still three rows.
    result = CliRunner().invoke(main, ["eval", "compare-detectors", "--bin", str(bin_path), "--detectors", "retinaface",
                                       "--no-cache", "--out", str(out), "--pad", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "[tiny]images: 8 (0 features reused from the cache, 8 computed)" in result.output
    third = json.loads(out.with_suffix(".json").read_text())
    assert [row["detector"] for row in third["rows"]] == ["retinaface", None, "mtcnn"]
    assert third["meta"]["pad"] == 0 and third["rows"][2] == second["rows"][0]
