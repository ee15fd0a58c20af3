"""``eval ijbc`` outputs accumulate per method; features are keyed on the meta files' content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation import ijbc
from facepipe.evaluation.ijbc import ScoreConfig
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


def test_identification_1n_matches_plain_loops(mini_ijbc, tmp_path):
    from facepipe.evaluation.ijbc_features import FeatureCache
    from facepipe.evaluation.ijbc_layout import read_ijb_layout
    from tests.evaluation.test_ijbc import loop_template_features
    from tests.evaluation.test_ijbc_1n import loop_identification

    output = tmp_path / "out"
    stdout, _ = run_cli(str(mini_ijbc), "-o", str(output), "--protocol", "1n", "--configs", "N1D1F1,N0D0F1")
    assert stdout.splitlines()[0] == "| Methods | rank-1 | rank-5 | rank-10 | rank-20 | TPIR@FPIR=0.01 | TPIR@FPIR=0.1 |"
    entries = {e["name"]: e for e in json.loads((output / "identification.json").read_text())}
    assert list(entries) == [f"mobilefacenet {c} {g}" for c in ("N1D1F1", "N0D0F1") for g in ("G1", "G2", "mean")]

    layout = read_ijb_layout(mini_ijbc)
    manifest = next((output / "feature_cache").glob("*/manifest.json"))
    stored = json.loads(manifest.read_text())
    cache = FeatureCache(manifest.parent, stored["key"], stored["num_images"])
    feats = np.concatenate([f for _, f, _, _ in cache.iter_shards()])
    scores = np.concatenate([s for _, _, s, _ in cache.iter_shards()])
    sets = {}
    for name in ("G1", "G2", "probe_mixed"):
        lines = (mini_ijbc / "meta" / f"ijbc_1N_{'gallery_' if name != 'probe_mixed' else ''}{name}.csv").read_text().splitlines()[1:]
        sets[name] = list(dict.fromkeys((int(line.split(",")[0]), int(line.split(",")[1])) for line in lines))
    assert {s for _, s in sets["G1"]}.isdisjoint({s for _, s in sets["G2"]}) and len(sets["probe_mixed"]) == 8
    for code in ("N1D1F1", "N0D0F1"):
        template_feats, unique = loop_template_features(feats, scores, layout.templates, layout.medias, ScoreConfig.parse(code))
        template_of = dict(zip(unique, template_feats))
        for gallery in ("G1", "G2"):
            cmc, tpir = loop_identification(template_of, sets["probe_mixed"], sets[gallery])
            entry = entries[f"mobilefacenet {code} {gallery}"]
            assert entry["CMC"] == pytest.approx(cmc, abs=1e-12) and entry["TPIR@FPIR"] == pytest.approx(tpir, abs=1e-12)
        line = next(l for l in stdout.splitlines() if l.startswith(f"| mobilefacenet {code} mean |"))
        assert line.split(" | ")[1] == f"{entries[f'mobilefacenet {code} mean']['CMC']['rank1'] * 100:.2f}"
