"""Image-to-image search within identity cells against exact search."""

from __future__ import annotations

import numpy as np

from facepipe.audit.neighbours import exact_top_k, image_neighbours, nearest_in_cells


def _identities(seed=0, n_ids=60, per=20, d=32, noise=0.15):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    identity = np.repeat(np.arange(n_ids), per)
    x = centres[identity] + noise * rng.standard_normal((len(identity), d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x, identity, centres.astype(np.float32)


def _cells(x, identity, centres):
    _, nearest_centres = exact_top_k(x, centres, 2)
    return np.column_stack([identity, nearest_centres])


def test_one_cell_for_everything_is_exact_search():
    x, identity, _ = _identities()
    found = nearest_in_cells(x, np.zeros((len(x), 1), np.int64), k=6, chunk=500)  # chunks of queries within the cell
    truth_s, truth_i = exact_top_k(x, x, 6)
    np.testing.assert_allclose(found.similarities, truth_s, atol=1e-5)
    assert np.mean([set(a) == set(b) for a, b in zip(found.indices, truth_i)]) > 0.99  # ties aside
    assert found.recall > 0.99


def test_identity_cells_find_a_copy_filed_under_another_identity_and_report_their_recall():
    x, identity, centres = _identities()
    x[5] = x[700] + 1e-3  # image 5 (identity 0) is a copy of image 700 (identity 35)
    x[5] /= np.linalg.norm(x[5])
    found = nearest_in_cells(x, _cells(x, identity, centres), k=6, recall_sample=len(x))
    assert found.method.startswith("identity cells")
    assert found.indices[5, 1] == 700 and found.indices[700, 1] == 5
    _, truth = exact_top_k(x, x, 6)
    measured = np.mean([len(set(a) & set(b)) / 6 for a, b in zip(found.indices, truth)])
    assert found.recall == measured and measured > 0.95  # the reported recall is the real one (every row sampled)
    rows = np.repeat(np.arange(len(x)), 6)
    exact = np.einsum("ij,ij->i", x[rows], x[found.indices.reshape(-1)])
    np.testing.assert_allclose(found.similarities.reshape(-1), exact, atol=1e-5)  # exact products, best first
    assert (np.diff(found.similarities, axis=1) <= 0).all()
    assert all(len(set(row)) == 6 for row in found.indices)  # a pair sharing two cells is counted once


def test_small_sets_stay_exact():
    x, identity, centres = _identities(n_ids=10, per=5)
    found = image_neighbours(x, _cells(x, identity, centres), k=3)
    assert found.method == "exact" and found.recall == 1.0
    assert image_neighbours(x, _cells(x, identity, centres), k=3, exact_limit=0).method.startswith("identity cells")
