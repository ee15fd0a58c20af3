"""The per-identity job: in chunks it equals the whole-set functions, in one chunk to the bit, and on Ray the
audit's tables equal the local engine's."""

from __future__ import annotations

import numpy as np
import pytest

from facepipe.audit.checks import leave_one_out_scores, robust_centres, split_half_similarities
from facepipe.audit.identities import IdentityJob, _chunks, identity_statistics
from tests.audit.test_checks import _synthetic


def _whole(data):
    centres = robust_centres(data.vectors, data.identity, len(data.names))
    return centres, leave_one_out_scores(data.vectors, data.identity, centres), split_half_similarities(data.vectors, data.identity, len(data.names))


def test_chunks_hold_whole_identities_each_once():
    identity = np.array([2, 0, 0, 1, 3, 3, 3, 0, 1, 5])  # identity 4 has no image
    chunks = _chunks(identity, 6, chunk_rows=3)
    assert [(c.first, c.count) for c in chunks] == [(0, 1), (1, 2), (3, 2), (5, 1)]  # 4 rides along with 3
    assert sorted(np.concatenate([c.rows for c in chunks]).tolist()) == list(range(10))
    for c in chunks:
        assert (np.diff(c.rows) > 0).all() and (identity[c.rows] == c.identity + c.first).all()
    assert len(_chunks(identity, 6, chunk_rows=100)) == 1


def test_in_one_chunk_the_job_gives_the_whole_set_results_to_the_bit():
    data, *_ = _synthetic()
    centres, score, split = _whole(data)
    stats = identity_statistics(data.vectors, data.identity, len(data.names))
    assert len(IdentityJob(data.vectors, data.identity, len(data.names)).chunks) == 1
    np.testing.assert_array_equal(stats.centres.sums, centres.sums)
    np.testing.assert_array_equal(stats.centres.unit, centres.unit)
    np.testing.assert_array_equal(stats.centres.kept, centres.kept)
    np.testing.assert_array_equal(stats.score, score)
    np.testing.assert_array_equal(stats.split_half, split)


def test_in_many_chunks_the_job_gives_the_whole_set_results():
    data, *_ = _synthetic(seed=3)
    centres, score, split = _whole(data)
    stats = identity_statistics(data.vectors, data.identity, len(data.names), chunk_rows=50)
    assert len(IdentityJob(data.vectors, data.identity, len(data.names), chunk_rows=50).chunks) > 20
    np.testing.assert_allclose(stats.centres.sums, centres.sums, atol=1e-12)
    np.testing.assert_array_equal(stats.centres.counts, centres.counts)
    np.testing.assert_array_equal(stats.centres.kept, centres.kept)
    np.testing.assert_allclose(stats.score, score, atol=1e-12)
    np.testing.assert_allclose(stats.split_half, split, atol=1e-12)


@pytest.mark.slow  # a local Ray cluster starts in ~20-40 s on 2 shared cores
def test_ray_engine_gives_the_local_engine_tables(monkeypatch):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import facepipe.audit.identities as identities
    from facepipe.audit.run import audit
    from facepipe.engine.ray_engine import RayOptions

    data, *_ = _synthetic(seed=2)
    monkeypatch.setattr(identities, "CHUNK_ROWS", 100)  # ~13 chunks: several tasks, results gathered out of order
    local = audit(data)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        on_ray = audit(data, engine="ray", ray_options=RayOptions(actors=1))
    finally:
        ray.shutdown()
    for name, table in local.tables.items():
        assert table.equals(on_ray.tables[name]), name
    assert local.thresholds == on_ray.thresholds
