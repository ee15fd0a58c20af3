"""``facepipe audit`` on bad input (issue 13): NaN embeddings, identities too small to derive a threshold from, a
folder without its manifest, and an evaluation folder of another model: a counted skip or one clear line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from click.testing import CliRunner

from facepipe.cli import main
from tests.commands.test_audit import audited  # noqa: F401  (the real CFP embedding folder, with its faults)


def _copy(audited, tmp_path, name="emb"):  # noqa: F811
    root, _ = audited
    target = tmp_path / name
    shutil.copytree(root / "emb", target)
    return target


def _relabel(emb, identities) -> None:
    """Rewrite the manifest's identity column (the rows stay as embedded)."""
    manifest = pd.read_parquet(emb / "manifest.parquet")
    manifest["identity"] = identities(manifest)
    manifest.to_parquet(emb / "manifest.parquet", index=False)


def _audit(*args):
    result = CliRunner().invoke(main, ["audit", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def test_nan_embeddings_are_skipped_and_counted(audited, tmp_path):  # noqa: F811
    emb = _copy(audited, tmp_path)
    shard = sorted((emb / "shards").glob("*.npy"))[0]
    vectors = np.load(shard)
    vectors[[0, 3]] = np.nan
    np.save(shard, vectors)
    result = _audit(emb, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    clean = json.loads((audited[0] / "out" / "summary.json").read_text())
    ok_rows = summary["skipped"]["error_rows"] == 1 and summary["skipped"]["non_finite"] == 2
    assert ok_rows and summary["images"] == clean["images"] - 2
    assert "'non_finite': 2" in result.output


def test_identities_too_small_for_a_threshold_are_one_line_naming_the_override(audited, tmp_path):  # noqa: F811
    single = _copy(audited, tmp_path, "single")
    _relabel(single, lambda m: m["path"])  # every image its own identity
    result = _audit(single, "--out", tmp_path / "o1")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        "Error: cannot derive T_image from this set: no identity has 2 or more usable images; give --image-threshold"
    )
    pairs = _copy(audited, tmp_path, "pairs")
    _relabel(pairs, lambda m: [f"id{i // 2}" for i in range(len(m))])  # identities of two images
    result = _audit(pairs, "--out", tmp_path / "o2")
    assert result.exit_code == 1 and "cannot derive T_identity from this set: no identity has 4 or more usable images" in result.output
    assert "give --identity-threshold" in result.output
    result = _audit(pairs, "--out", tmp_path / "o3", "--identity-threshold", "0.7")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o3" / "summary.json").read_text())
    assert summary["thresholds"]["identity"] == 0.7 and summary["thresholds"]["how"]["identity"] == "given"


def test_a_folder_without_its_manifest_is_one_line(audited, tmp_path):  # noqa: F811
    emb = _copy(audited, tmp_path)
    (emb / "manifest.parquet").unlink()
    result = _audit(emb, "--out", tmp_path / "out")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "manifest" in result.output


def test_an_evaluation_folder_of_another_model_is_one_line(audited, tmp_path):  # noqa: F811
    root, _ = audited
    other = _copy(audited, tmp_path, "other")
    run = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**run, "model": "iresnet50", "weights": "backbone.pth"}))
    result = _audit(root / "emb", "--against", other, "--out", tmp_path / "out")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "other: embedded with another model (model 'iresnet50' vs 'mobilefacenet', weights 'backbone.pth' vs None)" in result.output
