import numpy as np
import pytest

from facepipe.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text


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
