"""``facepipe eval quality`` on real CFP images: curves for every measure, written and ranked."""

from __future__ import annotations

import json

import pytest
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


def test_quality_curves_on_ijbc_templates_equal_a_plain_loop(tmp_path):
    """The mini IJB-C from CFP: template quality = mean of its images'; the curve equals a plain re-statement."""
    import numpy as np

    from facepipe.detection.base import create_detector
    from facepipe.evaluation.ijbc_layout import read_ijb_layout
    from facepipe.evaluation.ijbc_mini import build_mini_ijbc
    from facepipe.quality import inter_ocular_distance

    root = tmp_path / "mini"
    build_mini_ijbc(shared_path("cfp", "cfp-dataset"), root, create_detector("retinaface"), num_subjects=6, seed=3, progress=False)
    result = CliRunner().invoke(main, ["eval", "quality", "--ijbc", str(root), "--fmr", "0.05", "--threads", "1",
                                       "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "evrc.json").read_text())
    layout = read_ijb_layout(root, "IJBC")
    templates = np.unique(layout.templates)
    assert report["pairs"] == len(layout.labels) and report["templates"] == len(templates)
    scores = _pair_scores(tmp_path / "q" / "feature_cache", layout)
    eyes = inter_ocular_distance(layout.landmarks)
    quality = {t: eyes[layout.templates == t].mean() for t in templates}
    order = sorted(templates, key=lambda t: (quality[t], int(np.searchsorted(templates, t))))
    curve = next(c for c in report["curves"] if c["name"] == "inter_ocular")
    enough = max(10, int(np.ceil(0.01 * layout.labels.sum())))
    for fraction, fnmr in zip(curve["reject_fractions"], curve["fnmr"]):
        rejected = set(order[: int(np.floor(fraction * len(templates) + 1e-9))])
        mated = [i for i, (a, b) in enumerate(zip(layout.pair_t1, layout.pair_t2))
                 if a not in rejected and b not in rejected and layout.labels[i]]
        if len(mated) < enough:
            assert fnmr is None or np.isnan(fnmr)
        else:
            assert fnmr == pytest.approx(np.mean([not scores[i] > report["threshold"] for i in mated]))


def _pair_scores(cache_root, layout):
    """Template-pair scores as `eval ijbc` computes them (N1D1F1), from the cache the command filled."""
    from facepipe.evaluation.ijbc import ScoreConfig, TemplatePooling, pool_templates, score_pairs
    from facepipe.evaluation.ijbc_features import FeatureCache

    folder = next(p for p in cache_root.iterdir() if p.is_dir())
    stored = json.loads((folder / "manifest.json").read_text())
    cache = FeatureCache(folder, stored["key"], stored["num_images"])
    pooling = TemplatePooling.build(layout.templates, layout.medias)
    config = ScoreConfig()
    feats = pool_templates(pooling, cache.iter_shards(), [config])[config]
    return score_pairs(feats, pooling.template_rows(layout.pair_t1), pooling.template_rows(layout.pair_t2))
