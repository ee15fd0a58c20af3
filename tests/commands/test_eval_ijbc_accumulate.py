"""``eval ijbc`` outputs accumulate per method; features are keyed on the meta files' content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation import ijbc
from facepipe.evaluation.ijbc_mini import build_mini_ijbc
from tests.conftest import shared_path

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def mini_ijbc(tmp_path_factory) -> Path:
    from facepipe.detection.base import create_detector

    root = tmp_path_factory.mktemp("mini") / "IJBC"
    build_mini_ijbc(shared_path("cfp", "cfp-dataset"), root, create_detector("retinaface"), num_subjects=4, seed=5, progress=False)
    return root


def run_cli(*args: str) -> tuple[str, str]:
    result = CliRunner().invoke(main, ["eval", "ijbc", *args, "--threads", "1", "--shard-size", "20"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout, result.stderr


def table_rows(output: Path) -> dict[str, list[str]]:
    lines = (output / "table.md").read_text().splitlines()[2:]
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines}


def test_two_methods_accumulate_and_a_rerun_replaces_its_rows(mini_ijbc, tmp_path, monkeypatch):
    legends = []
    real_plot = ijbc.plot_roc

    def recording_plot(curves, path, *args, **kwargs):
        legends.append([label for label, _, _ in curves])
        return real_plot(curves, path, *args, **kwargs)

    monkeypatch.setattr(ijbc, "plot_roc", recording_plot)
    output = tmp_path / "out"
    run_cli(str(mini_ijbc), "-o", str(output), "--name", "base")
    _, stderr = run_cli(str(mini_ijbc), "-o", str(output), "--name", "other", "--no-flip")
    assert "given: features of 56 images reused from the cache, 0 extracted" in stderr
    assert list(table_rows(output)) == ["other N1D1F0", "base N1D1F1"]
    assert legends[-1] == ["other N1D1F0", "base N1D1F1"]
    stored = json.loads((output / "tar_far.json").read_text())
    assert [r["config"]["method"] for r in stored] == ["other", "base"]
    before = {name: cells for name, cells in table_rows(output).items()}

    # Edited landmarks: a new cache (nothing reused), new scores; the rerun of "base" replaces its own row.
    landmarks = mini_ijbc / "meta" / "ijbc_name_5pts_score.txt"
    original = landmarks.read_text()
    lines = original.splitlines()
    for i in range(0, len(lines), 2):  # every other image: eyes and mouth corners swapped (upside-down crops)
        name, *values, score = lines[i].split(" ")
        points = np.array(values, dtype=float).reshape(5, 2)[[3, 4, 2, 0, 1]]
        lines[i] = " ".join([name, *(f"{v:.2f}" for v in points.reshape(-1)), score])
    scores_before = np.load(output / "scores" / "base_N1D1F1.npy")
    try:
        landmarks.write_text("\n".join(lines) + "\n")
        _, stderr = run_cli(str(mini_ijbc), "-o", str(output), "--name", "base")
    finally:
        landmarks.write_text(original)
    assert "given: features of 0 images reused from the cache, 56 extracted" in stderr
    scores_after = np.load(output / "scores" / "base_N1D1F1.npy")
    assert np.abs(scores_after - scores_before).mean() > 0.05
    rows = table_rows(output)
    assert list(rows) == ["base N1D1F1", "other N1D1F0"] and legends[-1] == list(rows)
    assert rows["other N1D1F0"] == before["other N1D1F0"] and rows["base N1D1F1"] != before["base N1D1F1"]
    assert len(json.loads((output / "results.json").read_text())["entries"]) == 2
    assert len(list((output / "feature_cache").iterdir())) == 2  # one cache per landmarks content
