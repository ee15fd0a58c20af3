"""RunState: one settings check, commit-then-mark parts, growing inputs, the run lock."""

from __future__ import annotations

import multiprocessing

import pyarrow as pa
import pytest

from facepipe.io.run_state import RunState, RunStateError

SCHEMA = pa.schema([("key", pa.string()), ("value", pa.int64())])


def _state(tmp_path) -> RunState:
    return RunState(tmp_path / ".facepipe" / "run.json", tmp_path / ".facepipe" / "parts", prefix="chunk")


def _table(keys, start=0):
    return pa.table({"key": keys, "value": list(range(start, start + len(keys)))}, schema=SCHEMA)


def test_commit_merge_and_resume_with_the_same_settings(tmp_path):
    state = _state(tmp_path)
    state.start({"size": 112})
    state.commit_part(0, _table(["b", "a"]))
    state.commit_part(1, _table(["c"], 2))
    state.close()
    again = _state(tmp_path)
    again.start({"size": 112})
    assert again.done_parts() == [0, 1] and again.next_part_id() == 2
    assert again.done_keys() == {"a", "b", "c"}
    merged = again.merge(tmp_path / "manifest.parquet", SCHEMA, keep_keys={"a", "c"}, sort_by="key")
    assert merged.column("key").to_pylist() == ["a", "c"]
    assert merged.column("value").to_pylist() == [1, 2]
    again.close()


def test_other_settings_are_refused_with_the_changed_keys_named(tmp_path):
    state = _state(tmp_path)
    state.start({"size": 112, "keep": "largest"})
    state.close()
    with pytest.raises(RunStateError, match=r"\(keep differ\).*--overwrite"):
        _state(tmp_path).start({"size": 112, "keep": "all"})


def test_overwrite_hands_the_old_rows_to_discard_then_deletes_the_parts(tmp_path):
    state = _state(tmp_path)
    state.start({"size": 112})
    state.commit_part(0, _table(["a", "b"]))
    state.close()
    seen = []
    again = _state(tmp_path)
    again.start({"size": 224}, overwrite=True, discard=lambda rows: seen.extend(rows.column("key").to_pylist()))
    assert seen == ["a", "b"] and again.done_parts() == []
    again.close()


def test_leftover_temporary_files_are_removed_on_start(tmp_path):
    state = _state(tmp_path)
    state.start({})
    stale = state.parts_dir / ".chunk-000003.parquet.abc.tmp.parquet"
    stale.write_bytes(b"half")
    state.close()
    _state(tmp_path).start({})
    assert not stale.exists()


def test_abandon_unclaims_a_folder_where_nothing_was_committed(tmp_path):
    state = _state(tmp_path)
    state.start({"size": 112})
    state.abandon()
    assert not (tmp_path / ".facepipe").exists()
    _state(tmp_path).start({"size": 224})  # no mismatch: the failed start left nothing


def _hold_lock(path, ready, release):
    state = RunState(path / ".facepipe" / "run.json", path / ".facepipe" / "parts")
    state.start({})
    ready.set()
    release.wait(10)


def test_a_second_run_into_the_same_folder_names_the_holder(tmp_path):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunStateError, match=rf"in use by pid {holder.pid} "):
            RunState(tmp_path / ".facepipe" / "run.json", tmp_path / ".facepipe" / "parts").start({})
    finally:
        release.set()
        holder.join(10)
    RunState(tmp_path / ".facepipe" / "run.json", tmp_path / ".facepipe" / "parts").start({})  # released on exit


def test_a_corrupt_settings_file_is_one_clear_error(tmp_path):
    state = _state(tmp_path)
    state.start({})
    state.close()
    state.run_file.write_bytes(b"\xff{not json")
    with pytest.raises(RunStateError, match="unreadable.*--overwrite"):
        _state(tmp_path).start({})


def test_overwrite_starts_over_even_when_the_settings_file_is_unreadable(tmp_path):
    state = _state(tmp_path)
    state.start({"size": 112})
    state.commit_part(0, _table(["a"]))
    state.close()
    state.run_file.write_bytes(b"\xff{not json")
    again = _state(tmp_path)
    again.start({"size": 224}, overwrite=True)
    assert again.done_parts() == [] and again.previous_settings() == {"size": 224}
    again.close()
