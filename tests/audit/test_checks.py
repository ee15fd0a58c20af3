"""The audit's checks against plain re-statements, on synthetic identities with known faults."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.audit.checks import equal_density_boundary, label_noise, robust_centres
from facepipe.audit.data import AuditInputError, EmbeddingSet, check_same_model
from facepipe.audit.neighbours import exact_top_k, nearest
from facepipe.audit.run import audit


def _synthetic(seed=0, n_ids=120, per=10, d=64, moved=12, splits=4, copies=8):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_ids), per)
    x = centres[truth] + 0.11 * rng.standard_normal((len(truth), d))
    labels = truth.copy()
    moved_rows = rng.choice(len(truth), moved, replace=False)
    labels[moved_rows] = (truth[moved_rows] + 1 + rng.integers(0, n_ids - 1, moved)) % n_ids
    names = [f"id{i:03d}" for i in range(n_ids)] + [f"split{i}" for i in range(splits)]
    for i in range(splits):
        labels[np.flatnonzero((truth == i) & (labels == i))[::2]] = n_ids + i
    sources = rng.choice(len(truth), copies, replace=False)
    x = np.concatenate([x, x[sources] + 0.004 * rng.standard_normal((copies, d))])
    labels = np.concatenate([labels, labels[sources]])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    paths = [f"{names[label]}/{i:05d}.jpg" for i, label in enumerate(labels)]
    data = EmbeddingSet("train", x, paths, labels.astype(np.int64), names, {"model": "m", "weights": None, "flip": True})
    copy_pairs = {(paths[s], paths[len(truth) + j]) for j, s in enumerate(sources)}
    return data, {paths[r] for r in moved_rows}, {(f"id{i:03d}", f"split{i}") for i in range(splits)}, copy_pairs


def test_leave_one_out_scores_equal_a_plain_loop():
    data, *_ = _synthetic(n_ids=20, per=6)
    centres = robust_centres(data.vectors, data.identity, len(data.names))
    noise = label_noise(data.vectors, data.identity, centres)
    x = data.vectors.astype(np.float64)
    for i in range(0, len(x), 7):
        members = [j for j in np.flatnonzero(data.identity == data.identity[i]) if centres.kept[j] and j != i]
        if not members:
            assert np.isnan(noise.score[i])
            continue
        centre = x[members].sum(axis=0)
        assert noise.score[i] == pytest.approx(x[i] @ centre / np.linalg.norm(centre), abs=1e-6)
        others = [(x[i] @ centres.unit[a], a) for a in range(len(data.names)) if a != data.identity[i] and centres.counts[a]]
        assert noise.best_other_score[i] == pytest.approx(max(others)[0], abs=1e-5)


def test_every_kind_of_fault_is_found_with_data_derived_thresholds():
    data, moved, split_pairs, copy_pairs = _synthetic()
    result = audit(data)
    noise = result.tables["label_noise"]
    flagged = set(noise.loc[noise["flagged"], "path"])
    assert moved <= flagged and len(flagged - moved) <= 2
    dup = result.tables["duplicate_identities"]
    assert {tuple(sorted(p)) for p in dup.loc[dup["flagged"], ["identity_a", "identity_b"]].itertuples(index=False)} == split_pairs
    near = result.tables["near_duplicates"]
    found = {tuple(sorted(p)) for p in near.loc[near["flagged"], ["path_a", "path_b"]].itertuples(index=False)}
    assert found == {tuple(sorted(p)) for p in copy_pairs}
    assert result.summary["thresholds"]["how"]["image"].startswith("equal-density")
    assert noise["score"].is_monotonic_increasing  # most suspicious first


def test_overlap_with_an_evaluation_set_with_and_without_identities():
    data, *_ = _synthetic(seed=1)
    rng = np.random.default_rng(5)
    shared = data.vectors[data.identity == 7][:4] + 0.05 * rng.standard_normal((4, data.vectors.shape[1])).astype(np.float32)
    fresh = rng.standard_normal((4, data.vectors.shape[1])).astype(np.float32)
    vectors = np.concatenate([shared, fresh])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    evaluation = EmbeddingSet("lfw", vectors, [f"e/{i}" for i in range(8)], np.array([0] * 4 + [1] * 4), ["alice", "nobody"], data.model)
    images_only = EmbeddingSet("x.bin", vectors, [f"x.bin#{i}" for i in range(8)], np.full(8, -1), [], data.model)
    overlap = audit(data, [evaluation, images_only]).tables["overlap"]
    hits = overlap.loc[overlap["flagged"]]
    assert set(hits.loc[hits["against"] == "lfw", "other"]) == {"alice"}
    assert set(hits["identity"]) == {"id007"}
    assert set(hits.loc[hits["against"] == "x.bin", "other"]) == {f"x.bin#{i}" for i in range(4)}


def test_sets_of_another_model_are_refused_in_one_line():
    data, *_ = _synthetic(n_ids=10, per=4)
    other = EmbeddingSet("o", np.ones((2, 32), np.float32), ["a", "b"], np.array([0, 1]), ["a", "b"], data.model)
    with pytest.raises(AuditInputError, match="32-d embeddings, the training set's are 64-d"):
        check_same_model(data, other)
    other = EmbeddingSet("o", data.vectors[:2], ["a", "b"], np.array([0, 1]), ["a", "b"], {**data.model, "model": "iresnet50"})
    with pytest.raises(AuditInputError, match="another model"):
        check_same_model(data, other)


def test_ivf_search_reports_its_recall():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((4000, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    exact = nearest(base[:300], base, k=5)
    approx = nearest(base[:300], base, k=5, exact_limit=0, nprobe=4)
    assert exact.method == "exact" and approx.method.startswith("ivf")
    found = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact.indices, approx.indices)])
    assert approx.recall == pytest.approx(found, abs=0.08) and 0 < approx.recall <= 1


def test_equal_density_boundary_of_two_normals():
    rng = np.random.default_rng(0)
    boundary = equal_density_boundary(rng.normal(0.7, 0.05, 5000), rng.normal(0.1, 0.05, 5000))
    assert boundary == pytest.approx(0.4, abs=0.01)


def test_compressed_search_reranks_exactly_and_reports_recall():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((6000, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[:200] + 0.02 * rng.standard_normal((200, 64)).astype(np.float32)
    found = nearest(queries, base.astype(np.float16), k=3, exact_limit=0, flat_bytes=0, nprobe=8)
    assert found.method.startswith("ivfpq")
    _, truth = exact_top_k(queries, base, 3)
    measured = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(found.indices, truth)])
    assert found.recall == pytest.approx(measured, abs=0.05)  # the sampled recall is the real one
    assert (found.indices[:, 0] == np.arange(200)).mean() > 0.95  # the perturbed source is the top hit
    exact = base[found.indices[:, 0]].astype(np.float16).astype(np.float32) @ queries.T
    np.testing.assert_allclose(found.similarities[:, 0], np.diag(exact), atol=1e-5)  # re-ranked with exact products
