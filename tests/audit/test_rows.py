"""``ShardRows`` against the same rows normalised in memory: ranges across shards, gathers, skipped rows,
pickling, and the resident set released."""

from __future__ import annotations

import pickle
import resource

import numpy as np
import pytest

from facepipe.audit.rows import ShardRows


@pytest.fixture
def shards(tmp_path):
    """Three shard files (float32, float16, float32) of raw rows, and the positions taken from each."""
    rng = np.random.default_rng(0)
    raw = [rng.standard_normal((n, 24)).astype(dtype) * 3 for n, dtype in ((50, np.float32), (40, np.float16), (30, np.float32))]
    positions = [np.arange(50), np.array([0, 3, 4, 9, 39, 20]), np.arange(30)]  # the middle shard: some rows, out of order
    files = []
    for i, matrix in enumerate(raw):
        np.save(tmp_path / f"emb-{i:06d}.npy", matrix)
        files.append(tmp_path / f"emb-{i:06d}.npy")
    whole = np.concatenate([m[p].astype(np.float32) for m, p in zip(raw, positions)])
    expected = whole / np.linalg.norm(whole, axis=1)[:, None]
    return ShardRows(list(zip(files, positions))), expected


def test_ranges_and_gathers_equal_the_rows_normalised_in_memory(shards):
    rows, expected = shards
    assert rows.shape == expected.shape == (86, 24) and len(rows) == 86
    np.testing.assert_array_equal(rows[0:86], expected)  # bit for bit: the same float32 operations
    np.testing.assert_array_equal(rows[45:60], expected[45:60])  # across the shard boundaries
    np.testing.assert_array_equal(rows[80:200], expected[80:])
    picks = np.array([85, 0, 52, 52, 49, 50, 3])  # unsorted, repeated, every shard
    np.testing.assert_array_equal(rows[picks], expected[picks])
    np.testing.assert_array_equal(rows[-1], expected[-1])
    np.testing.assert_array_equal(np.asarray(rows), expected)
    np.testing.assert_array_equal(rows[expected[:, 0] > 0], expected[expected[:, 0] > 0])
    with pytest.raises(IndexError):
        rows[np.array([86])]


def test_pickles_as_a_reference_and_reads_the_same(shards):
    rows, expected = shards
    payload = pickle.dumps(rows)
    assert len(payload) < 2000  # file names and positions, not the rows
    np.testing.assert_array_equal(pickle.loads(payload)[10:70], expected[10:70])


def test_reading_a_large_file_leaves_the_resident_set_bounded(tmp_path):
    n = 200_000  # 200 MB of float32 rows
    matrix = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, 256))
    matrix[:] = 1.0
    matrix.flush()
    del matrix
    rows = ShardRows([(tmp_path / "big.npy", np.arange(n))])

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    before = resident_mb()
    for start in range(0, n, 8192):
        assert rows[start : start + 8192].shape == (min(8192, n - start), 256)
    rng = np.random.default_rng(0)
    for _ in range(50):
        assert rows[rng.choice(n, 500)].shape == (500, 256)  # scattered gathers
    assert resident_mb() - before < 40  # read 200 MB and 25,000 scattered rows; none of the file stays resident
