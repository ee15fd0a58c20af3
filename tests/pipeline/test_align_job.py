"""The align job on the job layer: run through the engine, growing and shrinking inputs, the naming rule,
--overwrite, restartable RecordIO finishing, robust starts (lock, failed starts, leftovers, unwritable outputs,
disk full, bad options), non-UTF-8 names and file permissions.

Most tests align synthetic 112x112 images from a landmarks file holding the ArcFace template points: the warp is
then the identity, so a PNG crop equals its input image exactly and each crop can be traced back to its input.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from facepipe.alignment import arcface_template
from facepipe.cli import main
from facepipe.engine.local import run_job, run_local
from facepipe.io.recordio import RecordIOReader
from facepipe.pipeline import sinks
from facepipe.pipeline.align import AlignConfig, AlignJob, run_align
from facepipe.pipeline.manifest import MANIFEST_SCHEMA, RunStateError, decode_name, encode_name, read_manifest
from facepipe.pipeline.sinks import OutputNames
from facepipe.pipeline.sources import directory_source
from tests.conftest import shared_path

TEMPLATE = arcface_template(112)


def _image(seed: int) -> np.ndarray:
    """A distinct 112x112 image per seed (a crop of it identifies its input)."""
    return np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)


def _add(root: Path, keys: list[str], seed0: int = 0) -> None:
    for n, key in enumerate(keys):
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(".png", _image(seed0 + n))
        path.write_bytes(data.tobytes())


def _landmarks(root: Path, lm_file: Path) -> str:
    """Template landmarks for every image under ``root`` (identity warp)."""
    points = " ".join(f"{v:.6f}" for v in TEMPLATE.reshape(-1))
    keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    lm_file.write_text("".join(f"{key} {points}\n" for key in keys))
    return str(lm_file)


def _config(root: Path, lm_file: Path, **options) -> AlignConfig:
    return AlignConfig(landmarks_file=_landmarks(root, lm_file), image_format="png", **options)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".facepipe" not in p.parts and p.name != "manifest.parquet"
    }


def _manifest(path: Path) -> list[str]:
    """The manifest's rows as text (a landmarks file gives NaN boxes, which compare unequal as floats)."""
    return [repr(row) for row in read_manifest(path)]


def _crop_of(path: Path) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)


def _align(src: Path, out: Path, lm: Path, **kwargs):
    return run_align(_config(src, lm), directory_source(src), out, workers=0, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------ engine


def test_align_job_runs_through_the_local_engine_in_process(tmp_path):
    src = tmp_path / "in"
    _add(src, ["a/1.png", "a/2.png", "b/1.png"])
    config = _config(src, tmp_path / "lm.txt")
    with AlignJob(config, directory_source(src), tmp_path / "out", chunk_size=2, batch_size=1) as job:
        assert [(u.id, u.items, len(u.batches)) for u in job.pending()] == [(0, 2, 2), (1, 1, 1)]
        summary = run_job(job, workers=0, progress=False)
    assert (summary.processed, summary.skipped, summary.crops_written) == (3, 0, 3)
    rows = read_manifest(tmp_path / "out" / "manifest.parquet")
    assert [(r.index, r.key, r.outputs) for r in rows] == [(0, "a/1.png", ["a/1.png"]), (1, "a/2.png", ["a/2.png"]), (2, "b/1.png", ["b/1.png"])]
    for n, row in enumerate(rows):
        assert np.array_equal(_crop_of(tmp_path / "out" / row.outputs[0]), _image(n))  # identity warp, lossless


def test_manifest_landmarks_are_five_xy_pairs_per_crop(tmp_path):
    src = tmp_path / "in"
    _add(src, ["a.png"])
    _align(src, tmp_path / "out", tmp_path / "lm.txt")
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    assert table.schema.field("landmarks").type == pa.list_(pa.list_(pa.list_(pa.float32(), 2), 5))
    assert table.schema == MANIFEST_SCHEMA
    landmarks = np.array(read_manifest(tmp_path / "out" / "manifest.parquet")[0].landmarks)
    assert landmarks.shape == (1, 5, 2)
    assert np.allclose(landmarks[0], TEMPLATE, atol=1e-4)


# ------------------------------------------------------------------------------------------------ growing


def test_growing_input_processes_only_new_items_and_matches_a_fresh_run(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["b/1.png", "b/2.png", "c/1.png", "c/2.png"])
    out = tmp_path / "out"
    _align(src, out, lm, chunk_size=2)
    before = {p: (out / p).stat().st_ino for p in _files(out)}
    _add(src, ["a/1.png", "b/15.png", "d/1.png"], seed0=10)  # before, among and after the done ones
    grown = _align(src, out, lm, chunk_size=2)
    assert (grown.processed, grown.skipped, grown.removed) == (3, 4, 0)
    assert "3 images processed (4 already done)" in grown.format()
    assert {p: (out / p).stat().st_ino for p in before} == before  # finished crops untouched
    parts = sorted(p.name for p in (out / ".facepipe" / "parts").iterdir())
    # d/1 fills grid chunk 3 (untouched by the first run); a/1 and b/15, added among done items, a new chunk 4
    assert parts == [f"chunk-{i:06d}.parquet" for i in (0, 1, 3, 4)]
    fresh = _align(src, tmp_path / "fresh", lm, chunk_size=2)
    assert fresh.processed == 7
    assert _manifest(out / "manifest.parquet") == _manifest(tmp_path / "fresh" / "manifest.parquet")
    assert _files(out) == _files(tmp_path / "fresh")
    again = _align(src, out, lm, chunk_size=2)
    assert (again.processed, again.skipped, again.crops_written) == (0, 7, 0)


def test_shrinking_input_removes_the_outputs_of_gone_inputs(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a/1.png", "a/2.png", "b/1.png", "b/2.png", "c/1.png"])
    out = tmp_path / "out"
    for sink in ("dir", "tar"):
        _align(src, out / sink, lm, chunk_size=2, sink_kind=sink)
    (src / "a" / "2.png").unlink()
    (src / "c" / "1.png").unlink()
    for sink in ("dir", "tar"):
        summary = _align(src, out / sink, lm, chunk_size=2, sink_kind=sink)
        assert (summary.processed, summary.skipped, summary.removed) == (0, 3, 2)
        assert "2 inputs gone since the last run: their outputs removed" in summary.format()
        _align(src, tmp_path / f"fresh-{sink}", lm, chunk_size=2, sink_kind=sink)
        assert _manifest(out / sink / "manifest.parquet") == _manifest(tmp_path / f"fresh-{sink}" / "manifest.parquet")
    assert sorted(_files(out / "dir")) == ["a/1.png", "b/1.png", "b/2.png"]
    assert not (out / "dir" / "c").exists()  # the folder that held only gone crops
    members = []
    for shard in sorted((out / "tar" / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getnames()
    assert sorted(members) == ["a/1.png", "b/1.png", "b/2.png"]
    # a gone input that comes back is aligned again (its row and crop were removed with it)
    _add(src, ["c/1.png"], seed0=4)
    back = _align(src, out / "dir", lm, chunk_size=2)
    assert (back.processed, back.skipped) == (1, 3)
    assert np.array_equal(_crop_of(out / "dir" / "c" / "1.png"), _image(4))


def test_an_input_sharing_no_file_with_the_run_is_refused_not_emptied(tmp_path):
    lm = tmp_path / "lm.txt"
    _add(tmp_path / "in", ["a/1.png", "a/2.png"])
    _align(tmp_path / "in", tmp_path / "out", lm)
    with pytest.raises(RunStateError, match="none of which is in"):  # e.g. INPUT pointed one folder too deep
        _align(tmp_path / "in" / "a", tmp_path / "out", lm)
    assert sorted(_files(tmp_path / "out")) == ["a/1.png", "a/2.png"]
    replaced = _align(tmp_path / "in" / "a", tmp_path / "out", lm, overwrite=True)
    assert replaced.processed == 2 and sorted(_files(tmp_path / "out")) == ["1.png", "2.png"]


def test_recordio_output_is_rebuilt_in_input_order_when_the_input_grows(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["b/1.png", "c/1.png"])
    out = tmp_path / "out"
    _align(src, out, lm, chunk_size=1, sink_kind="recordio")
    _add(src, ["a/1.png", "b/2.png"], seed0=10)  # a new identity first, and an image for an existing one
    grown = _align(src, out, lm, chunk_size=1, sink_kind="recordio")
    assert (grown.processed, grown.skipped) == (2, 2)
    _align(src, tmp_path / "fresh", lm, chunk_size=1, sink_kind="recordio")
    assert _files(out) == _files(tmp_path / "fresh")  # train.rec, train.idx, labels.tsv byte for byte
    assert (out / "labels.tsv").read_text() == "0\ta\n1\tb\n2\tc\n"
    reader = RecordIOReader(out / "train.rec")
    assert [reader.read_image_record(k)[0].label[0] for k in reader.image_keys()] == [0.0, 1.0, 1.0, 2.0]


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "keys, expected",
    [
        (["a.jpg", "a.png"], ["a.png", "a.png.png"]),  # same stem
        (["a.jpg", "a.jpg.jpg", "a.png"], ["a.png", "a.jpg.png", "a.png.png"]),
        (["a.png", "a.png.png", "a.jpg.png", "a.jpg"], ["a.png.png", "a.png.png.png", "a.jpg.png", "a.png"]),
        (["x.png/y.png", "x.jpg"], ["x.png/y.png", "x.jpg.png"]),  # a file never takes a folder's name
        (["p/x.jpg", "p/x.png/y.png"], ["p/x.jpg.png", "p/x.png/y.png"]),
        (["A.png", "a.jpg"], ["A.png", "a.jpg.png"]),  # case-insensitively distinct
        (["a.png", "a.png.png", "b.jpg"], ["a.png", "a.png.png", "b.png"]),
    ],
)
def test_colliding_names_never_overwrite(tmp_path, keys, expected):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, keys)
    summary = _align(src, tmp_path / "out", lm)
    rows = {row.key: row for row in read_manifest(tmp_path / "out" / "manifest.parquet")}
    assert summary.counts["ok"] == len(keys)
    assert [rows[key].outputs[0] for key in keys] == expected
    assert len(_files(tmp_path / "out")) == len(keys)  # one file per crop: nothing overwritten
    for n, key in enumerate(keys):
        assert np.array_equal(_crop_of(tmp_path / "out" / rows[key].outputs[0]), _image(n)), key


def test_names_stay_stable_when_a_colliding_input_is_added(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a.png"])
    out = tmp_path / "out"
    _align(src, out, lm)
    _add(src, ["a.jpg"], seed0=1)  # sorts before a.png, same stem
    _align(src, out, lm)
    rows = {row.key: row.outputs for row in read_manifest(out / "manifest.parquet")}
    assert rows == {"a.jpg": ["a.jpg.png"], "a.png": ["a.png"]}  # the old crop keeps its name
    assert np.array_equal(_crop_of(out / "a.png"), _image(0)) and np.array_equal(_crop_of(out / "a.jpg.png"), _image(1))
    # a folder added where an earlier crop file is (q.jpg -> q.png, then q.png/z.png): an error row, no overwrite
    _add(src, ["q.jpg"], seed0=2)
    _align(src, out, lm)
    _add(src, ["q.png/z.png"], seed0=3)
    _align(src, out, lm)
    rows = {row.key: row for row in read_manifest(out / "manifest.parquet")}
    assert rows["q.png/z.png"].status == "error" and "would replace a crop" in rows["q.png/z.png"].reason
    assert rows["q.jpg"].outputs == ["q.png"] and np.array_equal(_crop_of(out / "q.png"), _image(2))


def test_keep_all_names_claim_their_stem():
    names = OutputNames("jpg", keep_all=True, folders=["a_0.jpg"], committed=["b_0.jpg", "b_1.jpg"])
    assert names.stem("a.jpg") == "a.jpg"  # a_0.jpg ... would collide with the folder a_0.jpg/
    assert names.stem("b.png") == "b.png"  # b_*: a committed input's crops
    assert names.stem("B.jpg") == "B.jpg"  # b_* is taken case-insensitively
    assert names.names("c", 2) == ["c_0.jpg", "c_1.jpg"]
    one = OutputNames("jpg", keep_all=False, folders=[], committed=[])
    assert [one.stem(k) for k in ("a.jpg", "a.png.jpg", "a.png", "a.png")] == ["a", "a.png", "a.png~1", "a.png~2"]


def test_tar_members_with_long_names(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    long_key = "/".join(["identity-folder-with-a-long-name"] * 4) + "/" + "x" * 120 + ".png"  # 252 characters
    _add(src, [long_key, "short.png"])
    _align(src, tmp_path / "out", lm, sink_kind="tar")
    with tarfile.open(tmp_path / "out" / "shards" / "chunk-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert sorted(members) == sorted([long_key, "short.png"])
    assert np.array_equal(cv2.imdecode(np.frombuffer(members[long_key], np.uint8), cv2.IMREAD_COLOR), _image(0))


# ------------------------------------------------------------------------------------------------ overwrite


@pytest.mark.parametrize("sink_kind", ["dir", "tar", "recordio"])
def test_overwrite_removes_what_the_old_settings_wrote(tmp_path, sink_kind):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a/1.png", "a/2.png", "b/1.png"])
    out = tmp_path / "out"
    run_align(_config(src, lm), directory_source(src), out, sink_kind=sink_kind, workers=0, progress=False)
    with pytest.raises(RunStateError, match="image_format"):
        run_align(AlignConfig(landmarks_file=str(lm)), directory_source(src), out, sink_kind="dir", workers=0, progress=False)
    run_align(AlignConfig(landmarks_file=str(lm)), directory_source(src), out, workers=0, progress=False, overwrite=True)
    assert sorted(_files(out)) == ["a/1.jpg", "a/2.jpg", "b/1.jpg"]  # no stale png crop, shard or train.rec
    assert not list((out / ".facepipe").glob("recordio/chunk-*"))


# ------------------------------------------------------------------------------------------------ finishing


def _patched_publish(monkeypatch, fail_at: int) -> list[int]:
    """Make the ``fail_at``-th atomic publish (every rename goes through it) raise, as a crash there would."""
    import facepipe.io.atomic as atomic
    import facepipe.io.recordio as recordio

    real = atomic.publish
    calls = [0]

    def publish(tmp, path, fsync=False):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError(errno.EIO, "injected failure", str(path))
        return real(tmp, path, fsync)

    monkeypatch.setattr(atomic, "publish", publish)
    monkeypatch.setattr(recordio, "publish", publish)
    monkeypatch.setattr(sinks, "publish", publish)
    return calls


def test_recordio_finish_is_restartable_at_every_step(tmp_path, monkeypatch):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a/1.png", "a/2.png", "b/1.png", "c/1.png"])
    config = _config(src, lm)
    run_align(config, directory_source(src), tmp_path / "ref", sink_kind="recordio", chunk_size=2, workers=0, progress=False)
    expected = _files(tmp_path / "ref")
    step = 1
    while True:
        out = tmp_path / f"crash{step}"
        with AlignJob(config, directory_source(src), out, "recordio", chunk_size=2) as job:
            run_local(job, 0, progress=False)  # every chunk committed
        with monkeypatch.context() as patch:
            calls = _patched_publish(patch, step)
            try:
                with AlignJob(config, directory_source(src), out, "recordio", chunk_size=2) as job:
                    job.finish()
                crashed = False
            except OSError:
                crashed = True
        rerun = run_align(config, directory_source(src), out, sink_kind="recordio", chunk_size=2, workers=0, progress=False)
        assert (rerun.processed, rerun.counts["ok"]) == (0, 4)
        assert _files(out) == expected, f"after a crash at publish #{step}"
        if not crashed:
            break
        step += 1
    assert calls[0] == step - 1 and step > 4  # rec, idx, labels.tsv, built marker, manifest: each one crashed once


# ------------------------------------------------------------------------------------------------ starts


def test_a_second_run_into_the_same_folder_is_refused_naming_the_holder(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a.png"])
    with AlignJob(_config(src, lm), directory_source(src), tmp_path / "out"):
        result = CliRunner().invoke(main, ["align", str(src), "--out", str(tmp_path / "out"), "--landmarks", str(lm),
                                           "--format", "png", "--workers", "0", "--no-progress"])
        assert result.exit_code == 1
        assert f"is in use by pid {os.getpid()}" in result.output and "Traceback" not in result.output


def test_failed_or_refused_starts_leave_the_folder_unclaimed(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a.png"])
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    runner = CliRunner()
    base = ["align", str(src), "--workers", "0", "--no-progress"]
    bad_weights = runner.invoke(main, [*base, "--out", str(tmp_path / "o1"), "--detector-weights", str(tmp_path / "bad.pth")])
    assert bad_weights.exit_code == 1 and "bad.pth" in bad_weights.output
    assert not (tmp_path / "o1").exists()  # nothing claimed: another run may use it with any settings
    for option, value in (("--detect-max-side", "-1"), ("--max-pixels", "0"), ("--size", "0"), ("--size", "-1"),
                          ("--size", "112x0")):
        result = runner.invoke(main, [*base, "--out", str(tmp_path / "o2"), option, value])
        assert result.exit_code == 2 and option in result.output, (option, value, result.output)
        assert not (tmp_path / "o2").exists()
    (tmp_path / "file").write_text("x")
    result = runner.invoke(main, [*base, "--out", str(tmp_path / "o3"), "--landmarks", str(lm),
                                  "--manifest", str(tmp_path / "file" / "m.parquet")])
    assert result.exit_code == 1 and "cannot write output" in result.output
    assert not (tmp_path / "o3").exists()
    with pytest.raises(OSError):  # the library checks too, before any work
        AlignJob(_config(src, lm), directory_source(src), tmp_path / "o4", manifest_path=tmp_path / "file" / "m.parquet")
    assert not (tmp_path / "o4").exists()


def test_a_killed_runs_temporary_files_are_cleaned_and_nothing_is_written_beside_out(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a/1.png", "b/1.png"])
    parent = tmp_path / "parent"
    out = parent / "out"
    for sink_kind in ("dir", "recordio", "tar"):
        _align(src, out / sink_kind, lm, sink_kind=sink_kind, chunk_size=1)
        state = out / sink_kind / ".facepipe"
        leftovers = [state / "staging" / ".0-0.png.abc.tmp.png", state / "parts" / ".chunk-000001.parquet.x.tmp.parquet",
                     out / sink_kind / ".train.rec.x.tmp.rec", out / sink_kind / ".manifest.parquet.x.tmp.parquet",
                     state / ".run.json.x.tmp.json"]
        for path in leftovers:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"partial")
        _align(src, out / sink_kind, lm, sink_kind=sink_kind, chunk_size=1)
        assert not [p for p in leftovers if p.exists()]
    assert [p.name for p in parent.iterdir()] == ["out"]


def test_disk_full_gives_one_line_and_a_rerun_completes(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, [f"{i}.png" for i in range(12)])  # ~37 KB each
    _landmarks(src, lm)
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = small / "out"
        args = ["align", str(src), "--out", str(out), "--landmarks", str(lm), "--format", "png", "--chunk-size", "2",
                "--workers", "0", "--no-progress"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1
        assert result.output.startswith("Error: no space left on the device") and len(result.output.splitlines()) == 1
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # nothing half-written
        assert not (out / "manifest.parquet").exists()
        parts = pq.read_table(out / ".facepipe" / "parts").to_pylist() if list((out / ".facepipe" / "parts").iterdir()) else []
        for row in parts:  # every committed chunk's crops are complete
            for name in row["outputs"]:
                assert _crop_of(out / name).shape == (112, 112, 3)
        committed = 2 * len(list((out / ".facepipe" / "parts").glob("chunk-*.parquet")))
        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)  # space freed
        done = CliRunner().invoke(main, args)
        assert done.exit_code == 0, done.output
        assert f"{12 - committed} images processed ({committed} already done)" in done.output
        run_align(_config(src, lm), directory_source(src), tmp_path / "ref", chunk_size=2, workers=0, progress=False)
        assert _files(out) == _files(tmp_path / "ref")
        assert _manifest(out / "manifest.parquet") == _manifest(tmp_path / "ref" / "manifest.parquet")
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_full_injected_in_a_sink_write_gives_one_line_and_nothing_half_written(tmp_path, monkeypatch):
    """The same without root: the 5th crop's write fails with ENOSPC."""
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, [f"{i}.png" for i in range(8)])
    _landmarks(src, lm)
    out = tmp_path / "out"
    args = ["align", str(src), "--out", str(out), "--landmarks", str(lm), "--format", "png", "--chunk-size", "2",
            "--workers", "0", "--no-progress"]
    real, calls = sinks.publish, [0]

    def publish(tmp, path, fsync=False):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tmp, path, fsync)

    with monkeypatch.context() as patch:
        patch.setattr(sinks, "publish", publish)
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and len(result.output.splitlines()) == 1
    assert result.output.startswith("Error: no space left on the device writing") and "4.png" in result.output
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not (out / "manifest.parquet").exists()
    assert sorted(p.name for p in (out / ".facepipe" / "parts").iterdir()) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0 and "4 images processed (4 already done)" in done.output
    run_align(_config(src, lm), directory_source(src), tmp_path / "ref", chunk_size=2, workers=0, progress=False)
    assert _files(out) == _files(tmp_path / "ref")


# ------------------------------------------------------------------------------------------------ names as bytes


def test_encoded_names_round_trip():
    rng = np.random.default_rng(0)
    names = ["plain/a.jpg", "é/ü.png", "back\\slash.jpg", "\\x41.jpg", os.fsdecode(b"caf\xe9/\xff\xfe.jpg")]
    names += [os.fsdecode(bytes(rng.integers(1, 256, 12, dtype=np.uint8)).replace(b"/", b"_")) for _ in range(200)]
    for name in names:
        stored = encode_name(name)
        stored.encode("utf-8")  # valid UTF-8 (what Arrow strings need)
        assert decode_name(stored) == name
    assert encode_name("plain/a.jpg") == "plain/a.jpg" and encode_name("é/ü.png") == "é/ü.png"
    assert len({encode_name(n) for n in names}) == len(set(names))


def test_non_utf8_file_names_are_aligned_and_recorded(tmp_path):
    src = tmp_path / "in"
    os.makedirs(os.fsencode(src) + b"/caf\xe9")
    face = shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", "01.jpg").read_bytes()
    with open(os.fsencode(src) + b"/caf\xe9/\xff.jpg", "wb") as f:
        f.write(face)
    key = "caf\\xe9/\\xff.jpg"  # sources name undecodable bytes \xNN (facepipe.io.files.printable_path): valid UTF-8
    for sink_kind in ("dir", "tar"):
        out = tmp_path / sink_kind
        summary = run_align(AlignConfig(), directory_source(src), out, sink_kind=sink_kind, workers=0, progress=False)
        assert summary.counts["ok"] == 1
        row = read_manifest(out / "manifest.parquet")[0]
        assert row.key == key and row.outputs == [key]
    assert (tmp_path / "dir" / key).is_file()  # outputs carry the printable name
    with tarfile.open(tmp_path / "tar" / "shards" / "chunk-000000.tar", errors="surrogateescape") as tar:
        assert tar.getnames() == [key]
    again = run_align(AlignConfig(), directory_source(src), tmp_path / "dir", workers=0, progress=False)
    assert (again.processed, again.skipped) == (0, 1)  # the stored key matches the file's name again


# ------------------------------------------------------------------------------------------------ permissions


def test_every_output_file_is_readable_by_all_under_umask_022(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a/1.png", "b/1.png"])
    old = os.umask(0o022)
    try:
        for sink_kind in ("dir", "recordio", "tar"):
            _align(src, tmp_path / sink_kind, lm, sink_kind=sink_kind, chunk_size=1)
    finally:
        os.umask(old)
    files = [p for sink in ("dir", "recordio", "tar") for p in (tmp_path / sink).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"1.png", "manifest.parquet", "chunk-000000.parquet", "run.json", "run.lock", "train.rec", "train.idx",
            "labels.tsv", "chunk-000000.tar"} <= names
    unreadable = [str(p) for p in files if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert unreadable == []


# ------------------------------------------------------------------------------------------------ old or broken state


def test_unreadable_or_old_run_state_is_refused_until_overwrite(tmp_path):
    src, lm = tmp_path / "in", tmp_path / "lm.txt"
    _add(src, ["a.png"])
    out = tmp_path / "out"
    _align(src, out, lm)
    run_file = out / ".facepipe" / "run.json"
    run_file.write_text("{not json")
    with pytest.raises(RunStateError, match="unreadable"):
        _align(src, out, lm)
    assert _align(src, out, lm, overwrite=True).processed == 1
    # a folder written before the job layer: its settings held the input list, its landmarks another layout
    import json

    settings = json.loads(run_file.read_text())
    del settings["manifest_version"]
    run_file.write_text(json.dumps({**settings, "inputs": 1, "inputs_digest": "0" * 64}))
    with pytest.raises(RunStateError, match="inputs, inputs_digest, manifest_version differ"):
        _align(src, out, lm)
    assert _align(src, out, lm, overwrite=True).processed == 1
    assert sorted(_files(out)) == ["a.png"]
