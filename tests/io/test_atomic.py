"""Atomic writes: complete or absent, the umask's permissions, nothing left behind."""

import os
import stat

import numpy as np
import pytest

from facepipe.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text, cleanup_temporaries


def test_file_appears_complete_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "deep" / "report.json"
    atomic_write_text(target, '{"a": 1}\n')
    assert target.read_text() == '{"a": 1}\n'
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_failure_keeps_the_previous_file_and_cleans_up(tmp_path):
    target = tmp_path / "shard.npy"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["shard.npy"]


def test_temporary_keeps_the_extension_for_format_sniffing_writers(tmp_path):
    target = tmp_path / "emb.npy"
    with atomic_path(target, fsync=True) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2]




@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_files_follow_the_umask_not_mkstemp_0600(tmp_path, umask_022):
    path = atomic_write_bytes(tmp_path / "report.json", b"{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_block_leaves_neither_the_file_nor_a_temporary(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.npy") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_cleanup_finds_a_killed_writers_temporaries(tmp_path):
    (tmp_path / ".a.jpg.x1y2.tmp.jpg").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".b.jpg.z.tmp.jpg").write_bytes(b"x")
    (tmp_path / "keep.jpg").write_bytes(b"x")
    assert cleanup_temporaries(tmp_path, recursive=True) == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["keep.jpg"]
