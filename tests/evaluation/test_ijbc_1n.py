"""1:N identification against a plain-loop statement of the NIST definitions, and insightface's rule where it differs."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.evaluation.ijbc import ScoreConfig, TemplatePooling, pool_templates
from facepipe.evaluation.ijbc_1n import (
    FPIR_LEVELS,
    RANKS,
    Searches,
    TemplateSet,
    evaluate_identification,
    read_template_set,
    tpir_insightface,
)
from facepipe.evaluation.ijbc_layout import IJBMetaError
from tests.evaluation.test_ijbc import synthetic_ijb


def loop_identification(template_of, probes, gallery):
    """NIST FRVT, written out: per probe, dot products one by one; a rank-1 mate counts at FPIR f when at its own
    score at most floor(f * N) non-mated searches would raise an alarm."""
    gallery_subjects = [s for _, s in gallery]
    ranks, mate_scores, non_mated_best = [], [], []
    for template, subject in probes:
        sims = [float(np.dot(template_of[template], template_of[g])) for g, _ in gallery]
        if subject in gallery_subjects:
            mate = max(sim for sim, s in zip(sims, gallery_subjects) if s == subject)
            ranks.append(1 + sum(1 for sim, s in zip(sims, gallery_subjects) if s != subject and sim >= mate))
            mate_scores.append(mate)
        else:
            non_mated_best.append(max(sims))
    cmc = {f"rank{r}": sum(rank <= r for rank in ranks) / len(ranks) for r in RANKS}
    tpir = {}
    for level in FPIR_LEVELS:
        allowed = int(np.floor(level * len(non_mated_best) + 1e-9))
        hits = [rank == 1 and sum(best >= score for best in non_mated_best) <= allowed for rank, score in zip(ranks, mate_scores)]
        tpir[repr(level)] = sum(hits) / len(hits)
    return cmc, tpir


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmc_and_tpir_equal_plain_loops(seed):
    rng = np.random.default_rng(seed)
    feats, scores, templates, medias, t1, t2, labels = synthetic_ijb(rng, num_subjects=40)
    config = ScoreConfig()
    pooling = TemplatePooling.build(templates, medias)
    template_feats = pool_templates(pooling, [(0, feats, scores)], [config])[config]
    template_of = {t: template_feats[i] for i, t in enumerate(pooling.unique_templates)}
    # synthetic_ijb pairs every gallery template (t1, one per subject) with every probe (t2); genuine pairs give
    # the probes' subjects.
    gallery_templates = list(dict.fromkeys(t1))
    probe_templates = list(dict.fromkeys(t2))
    subject_of = {g: i for i, g in enumerate(gallery_templates)}
    for a, b, genuine in zip(t1, t2, labels):
        if genuine:
            subject_of[b] = subject_of[a]
    # Galleries: even / odd subjects, the first 6 subjects in neither (non-mated everywhere), subject 7 twice in G2.
    g1 = [(g, subject_of[g]) for g in gallery_templates if subject_of[g] % 2 == 0 and subject_of[g] >= 6]
    g2 = [(g, subject_of[g]) for g in gallery_templates if subject_of[g] % 2 == 1 and subject_of[g] >= 6]
    extra = next(p for p in probe_templates if subject_of[p] == 7)
    g2.append((extra, 7))
    probes = [(p, subject_of[p]) for p in probe_templates if p != extra]
    as_set = lambda name, pairs: TemplateSet(name, np.array([t for t, _ in pairs]), np.array([s for _, s in pairs]))
    results = evaluate_identification(template_feats, pooling, [as_set("G1", g1), as_set("G2", g2)], as_set("probe", probes), "m")
    for result, gallery in zip(results, (g1, g2)):
        cmc, tpir = loop_identification(template_of, probes, gallery)
        assert result.cmc == pytest.approx(cmc, abs=1e-12) and result.tpir == pytest.approx(tpir, abs=1e-12)
        assert result.config["mated_searches"] + result.config["non_mated_searches"] == len(probes)
    assert results[2].name == "m mean" and results[2].cmc["rank1"] == pytest.approx((results[0].cmc["rank1"] + results[1].cmc["rank1"]) / 2)
    assert 0.3 < results[0].cmc["rank1"] <= results[0].cmc["rank20"] <= 1.0  # identity structure is found


def test_nist_threshold_allows_one_more_false_alarm_than_insightface():
    # 10 non-mated searches, FPIR 0.1: NIST allows one alarm (the mate at 0.7 beats all non-mated but 0.9),
    # insightface's threshold is the top non-mated score, so the same mate misses.
    non_mated = np.array([0.9, 0.5, 0.4, 0.3, 0.3, 0.2, 0.1, 0.1, 0.0, -0.1])
    searches = Searches(
        mated=np.r_[np.ones(2, bool), np.zeros(10, bool)], rank=np.r_[[1, 1], np.zeros(10, int)],
        mate_score=np.r_[[0.7, 0.95], np.full(10, -np.inf)], best_score=np.r_[[0.7, 0.95], non_mated],
    )
    from facepipe.evaluation.ijbc_1n import tpir_at_fpir

    tpirs, thresholds = tpir_at_fpir(searches, [0.1, 0.01])
    assert tpirs == {"0.1": 1.0, "0.01": 0.5} and 0.5 < thresholds["0.1"] < 0.5 + 1e-9
    assert tpir_insightface(searches, 0.1) == 0.5 and tpir_insightface(searches, 0.01) == 0.5


def test_template_set_file_is_checked(tmp_path):
    path = tmp_path / "ijbc_1N_gallery_G1.csv"
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,1,a.jpg\n5,1,b.jpg\n9,2,c.jpg\n")
    read = read_template_set(path, "G1", np.array([5, 9]))
    assert list(read.templates) == [5, 9] and list(read.subjects) == [1, 2]
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,1,a.jpg\n5,3,b.jpg\n")
    with pytest.raises(IJBMetaError, match="line 3: template 5 already has another subject"):
        read_template_set(path, "G1", np.array([5]))
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n5,1,a.jpg\n7,1,b.jpg\n")
    with pytest.raises(IJBMetaError, match="line 3: template 7 has no images"):
        read_template_set(path, "G1", np.array([5]))
