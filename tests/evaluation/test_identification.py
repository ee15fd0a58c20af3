"""`eval identify` on embedding folders against a plain re-statement of CMC and TPIR@FPIR (NIST)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation.identification import IdentificationInputError, identify
from tests.index.test_gallery import write_embedding_dir


def _plain(gallery_vectors, gallery_ids, probe_vectors, probe_ids):
    """Loops: templates = normalised identity means; rank = 1 + non-mates scoring >= the mate; NIST TPIR."""
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    names = sorted(set(gallery_ids))
    templates = {n: unit(np.mean([unit(v) for v, i in zip(gallery_vectors, gallery_ids) if i == n], axis=0)) for n in names}
    ranks, mate_scores, non_mated_best = [], [], []
    for vector, identity in zip(probe_vectors, probe_ids):
        scores = {n: float(unit(vector) @ t) for n, t in templates.items()}
        if identity in templates:
            mate = scores[identity]
            ranks.append(1 + sum(s >= mate for n, s in scores.items() if n != identity))
            mate_scores.append(mate)
        else:
            non_mated_best.append(max(scores.values()))
    cmc = {r: np.mean([k <= r for k in ranks]) for r in (1, 5, 10, 20)}
    tpir = {}
    for level in (0.01, 0.1):
        ordered = sorted(non_mated_best, reverse=True)
        allowed = int(np.floor(level * len(ordered) + 1e-9))
        threshold = np.nextafter(ordered[allowed], np.inf)
        tpir[level] = np.mean([k == 1 and s >= threshold for k, s in zip(ranks, mate_scores)])
    return cmc, tpir


def test_identify_equals_a_plain_loop(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((60, 32))
    gallery_ids = np.repeat(np.arange(40), 3)  # 40 enrolled people, 3 images each
    probe_ids = np.r_[np.repeat(np.arange(40), 2), np.arange(40, 60)]  # mated searches + 20 absent people
    gallery = centres[gallery_ids] + 0.9 * rng.standard_normal((len(gallery_ids), 32))
    probes = centres[probe_ids] + 0.9 * rng.standard_normal((len(probe_ids), 32))
    absent = centres[np.repeat(np.arange(40, 60), 2)] + 0.9 * rng.standard_normal((40, 32))
    name = lambda ids: [f"p{i:02d}" for i in ids]  # noqa: E731
    g = write_embedding_dir(tmp_path / "g", gallery, name(gallery_ids))
    p = write_embedding_dir(tmp_path / "p", probes, name(probe_ids))
    n = write_embedding_dir(tmp_path / "n", absent, [f"zz{i}" for i in range(40)])
    report = identify(g, p, n)
    cmc, tpir = _plain(gallery, name(gallery_ids), np.r_[probes, absent], name(probe_ids) + ["absent"] * 40)
    assert report.counts["mated_searches"] == 80 and report.counts["non_mated_searches"] == 60
    for r in (1, 5, 10, 20):
        assert report.cmc[f"rank{r}"] == pytest.approx(cmc[r])
    for level in (0.01, 0.1):
        assert report.tpir[repr(level)] == pytest.approx(tpir[level])
    assert 0.3 < report.cmc["rank1"] < 1.0  # a test that can fail: neither trivial nor hopeless

    result = CliRunner().invoke(main, ["eval", "identify", "--gallery", str(g), "--probes", str(p), "--non-mated", str(n),
                                       "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["CMC"]["rank1"] == pytest.approx(cmc[1])


def test_another_embedding_size_is_one_line(tmp_path):
    g = write_embedding_dir(tmp_path / "g", np.eye(4, 8), ["a", "b", "c", "d"])
    p = write_embedding_dir(tmp_path / "p", np.eye(4, 6), ["a", "b", "c", "d"])
    with pytest.raises(IdentificationInputError, match="6-d embeddings, the gallery's are 8-d"):
        identify(g, p)
    result = CliRunner().invoke(main, ["eval", "identify", "--gallery", str(g), "--probes", str(tmp_path)])
    assert result.exit_code == 1 and "Traceback" not in result.output
