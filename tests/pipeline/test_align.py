"""End-to-end tests of the align pipeline on real images from ../shared (RetinaFace-mnet, bundled weights)."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.alignment import norm_crop
from facepipe.cli import main
from facepipe.io.images import read_image
from facepipe.io.recordio import InsightfaceDatasetWriter, RecordIOReader
from facepipe.pipeline.align import AlignConfig, AlignWorker, pad_image, run_align
from facepipe.pipeline.manifest import RunStateError, read_manifest
from facepipe.pipeline.sources import directory_source, file_list_source, open_source
from tests.conftest import shared_path

CFP = ("cfp", "cfp-dataset", "Data", "Images")


def _cfp_tree(root: Path, identities=("001", "002"), per_identity=3) -> Path:
    for identity in identities:
        for name in sorted(os.listdir(shared_path(*CFP, identity, "frontal")))[:per_identity]:
            target = root / identity / f"frontal_{name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shared_path(*CFP, identity, "frontal", name), target)
    return root


def _golden_t1() -> np.ndarray:
    rows = np.load(shared_path("golden", "retinaface_mnet_shared.npz"))["images/group/t1.jpg"]
    return rows[rows[:, 4] > 0.5]


def _run(args: list[str]) -> "CliRunner.Result":
    result = CliRunner().invoke(main, ["align", *args, "--workers", "0", "--no-progress"], catch_exceptions=False)
    return result


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".facepipe" not in p.parts and p.name != "manifest.parquet"
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = _cfp_tree(tmp_path_factory.mktemp("input"))
    shutil.copy(shared_path("images", "group", "t1.jpg"), root / "t1.jpg")
    shutil.copy(shared_path("images", "group", "mask_white.jpg"), root / "mask_white.jpg")
    return root


def test_mirror_tree_manifest_and_crops(tree, tmp_path):
    out = tmp_path / "out"
    result = _run([str(tree), "--out", str(out), "--format", "png"])
    assert result.exit_code == 0, result.output
    assert "ok 7, no_face 1, error 0" in result.output
    rows = {row.key: row for row in read_manifest(out / "manifest.parquet")}
    assert sorted(rows) == sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg"))
    assert sorted(_files(out)) == sorted(k[:-4] + ".png" for k in rows if k != "mask_white.jpg")
    assert rows["mask_white.jpg"].status == "no_face" and rows["mask_white.jpg"].reason == "no face detected"
    assert rows["mask_white.jpg"].outputs == []
    for key in ("001/frontal_01.jpg", "002/frontal_02.jpg"):
        row = rows[key]
        assert row.status == "ok" and row.outputs == [key[:-4] + ".png"] and row.num_detected >= 1
        image = read_image(tree / key)
        assert (row.width, row.height) == (image.shape[1], image.shape[0])
        expected = norm_crop(image, np.array(row.landmarks[0]).reshape(5, 2))
        written = cv2.imread(str(out / row.outputs[0]), cv2.IMREAD_COLOR)
        assert np.abs(written.astype(int) - expected).max() <= 1  # manifest landmarks are float32-rounded
    # t1 (6 faces), keep=largest: the golden reference face with the largest box
    golden = _golden_t1()
    areas = (golden[:, 2] - golden[:, 0]) * (golden[:, 3] - golden[:, 1])
    t1 = rows["t1.jpg"]
    assert t1.num_detected == 6
    assert np.allclose(t1.boxes[0], golden[np.argmax(areas), :4], atol=0.05)
    assert np.allclose(np.reshape(t1.landmarks[0], -1), golden[np.argmax(areas), 5:], atol=0.05)


def test_keep_modes_on_a_group_photo(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_path("images", "group", "t1.jpg"), src / "t1.jpg")
    golden = _golden_t1()
    height, width = cv2.imread(str(src / "t1.jpg")).shape[:2]
    centres = (golden[:, :2] + golden[:, 2:4]) / 2
    expected = {
        "best": np.argmax(golden[:, 4]),
        "largest": np.argmax((golden[:, 2] - golden[:, 0]) * (golden[:, 3] - golden[:, 1])),
        "center": np.argmin(((centres - [width / 2, height / 2]) ** 2).sum(1)),
    }
    for keep, golden_row in expected.items():
        summary = run_align(AlignConfig(keep=keep), directory_source(src), tmp_path / keep, workers=0, progress=False)
        assert summary.counts["ok"] == 1
        row = read_manifest(tmp_path / keep / "manifest.parquet")[0]
        assert row.outputs == ["t1.jpg"]
        assert np.allclose(row.boxes[0], golden[golden_row, :4], atol=0.05), keep
    run_align(AlignConfig(keep="all"), directory_source(src), tmp_path / "all", workers=0, progress=False)
    row = read_manifest(tmp_path / "all" / "manifest.parquet")[0]
    assert row.outputs == [f"t1_{i}.jpg" for i in range(6)]
    assert sorted(_files(tmp_path / "all")) == row.outputs
    assert np.allclose(row.scores, golden[:, 4], atol=1e-3)
    assert np.allclose(np.array(row.boxes), golden[:, :4], atol=0.05)


def test_bad_inputs_each_become_a_row_and_the_run_exits_0(tmp_path):
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    face = shared_path(*CFP, "001", "frontal", "01.jpg")
    shutil.copy(face, src / "good.jpg")
    data = face.read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "zero.jpg").write_bytes(b"")
    (src / "text.jpg").write_text("not an image\n")
    bgr = read_image(face)
    Image.fromarray(bgr[:, :, ::-1].copy()).convert("CMYK").save(src / "cmyk.jpg", quality=95)
    cv2.imwrite(str(src / "deep16.png"), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(src / "gray.jpg"), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(src / "tiny.png"), np.zeros((1, 1, 3), np.uint8))
    cv2.imwrite(str(src / "wide.png"), np.zeros((600, 900, 3), np.uint8))  # over --max-pixels, not a JPEG
    (src / "broken.jpg").symlink_to(src / "gone.jpg")
    out = tmp_path / "out"
    result = _run([str(src), "--out", str(out), "--max-pixels", "500000"])
    assert result.exit_code == 0, result.output
    rows = {row.key: row for row in read_manifest(out / "manifest.parquet")}
    expected = {
        "good.jpg": ("ok", ""),
        "cmyk.jpg": ("ok", ""),
        "deep16.png": ("ok", ""),
        "gray.jpg": ("ok", ""),
        "tiny.png": ("no_face", "no face detected"),
        "truncated.jpg": ("error", "truncated JPEG (no end-of-image marker)"),
        "zero.jpg": ("error", "empty file (0 bytes)"),
        "text.jpg": ("error", "not a decodable image (corrupt, truncated or unsupported format)"),
        "wide.png": ("error", "image too large: 900x600 > 500000 pixels (only JPEGs are decoded reduced)"),
        "broken.jpg": ("error", "broken symbolic link"),
    }
    assert {key: (row.status, row.reason) for key, row in rows.items()} == expected
    assert rows["tiny.png"].width == 1 and rows["tiny.png"].height == 1


def test_unreadable_file_is_an_error_row(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_path(*CFP, "001", "frontal", "01.jpg"), src / "locked.jpg")
    shutil.copy(shared_path(*CFP, "001", "frontal", "02.jpg"), src / "open.jpg")
    (src / "locked.jpg").chmod(0)
    try:
        if os.geteuid() == 0:
            _align_as_unprivileged_user(tmp_path, src, tmp_path / "out")
        else:
            run_align(AlignConfig(), directory_source(src), tmp_path / "out", workers=0, progress=False)
    finally:
        (src / "locked.jpg").chmod(0o644)
    rows = {row.key: row for row in read_manifest(tmp_path / "out" / "manifest.parquet")}
    assert (rows["locked.jpg"].status, rows["locked.jpg"].reason) == ("error", "permission denied")
    assert rows["open.jpg"].status == "ok"


def _align_as_unprivileged_user(tmp_path: Path, src: Path, out: Path) -> None:
    """Root reads any file whatever its mode: run the CLI with the capabilities that allow it dropped."""
    setpriv = shutil.which("setpriv")  # util-linux
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    done = subprocess.run(
        [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}",
         sys.executable, "-m", "facepipe", "align", str(src), "--out", str(out), "--workers", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr


def test_large_jpeg_is_detected_at_reduced_size_with_boxes_in_original_pixels(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_path("images", "group", "t1.jpg"), src / "t1.jpg")  # 1280x886 = 1.13 MP
    config = AlignConfig(keep="all", max_pixels=400_000)
    run_align(config, directory_source(src), tmp_path / "out", workers=0, progress=False)
    row = read_manifest(tmp_path / "out" / "manifest.parquet")[0]
    assert row.status == "ok" and row.decode_scale == 2.0 and (row.width, row.height) == (1280, 886)
    golden = _golden_t1()
    boxes = np.array(row.boxes)
    assert len(boxes) == 6
    for box in golden[:, :4]:  # every reference face found again, in full-size coordinates
        assert np.abs(boxes - box).max(axis=1).min() < 8


def test_fatal_configuration_errors_exit_nonzero(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["align", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code != 0 and "input not found" in missing.output
    (tmp_path / "in").mkdir()
    shutil.copy(shared_path(*CFP, "001", "frontal", "01.jpg"), tmp_path / "in" / "a.jpg")
    (tmp_path / "file").write_text("x")
    unwritable = runner.invoke(main, ["align", str(tmp_path / "in"), "--out", str(tmp_path / "file" / "o")])
    assert unwritable.exit_code != 0 and "cannot write output" in unwritable.output
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    for workers in ("0", "1"):  # in-process, and raised in a worker process then reported by the main one
        bad_weights = runner.invoke(
            main, ["align", str(tmp_path / "in"), "--out", str(tmp_path / f"o{workers}"), "--workers", workers,
                   "--detector-weights", str(tmp_path / "bad.pth"), "--no-progress"]
        )
        assert bad_weights.exit_code != 0 and "cannot read weights file" in bad_weights.output and "bad.pth" in bad_weights.output
        assert not (tmp_path / f"o{workers}" / "manifest.parquet").exists()
    bad_size = runner.invoke(main, ["align", str(tmp_path / "in"), "--out", str(tmp_path / "o3"), "--size", "100"])
    assert bad_size.exit_code != 0 and "not a multiple of 112 or 128" in bad_size.output


def test_changed_settings_are_refused_until_overwrite(tree, tmp_path):
    src = tmp_path / "in"
    _cfp_tree(src, identities=("003",), per_identity=1)
    run_align(AlignConfig(), directory_source(src), tmp_path / "out", workers=0, progress=False)
    with pytest.raises(RunStateError, match="size"):
        run_align(AlignConfig(size=224), directory_source(src), tmp_path / "out", workers=0, progress=False)
    summary = run_align(AlignConfig(size=224), directory_source(src), tmp_path / "out", workers=0, progress=False, overwrite=True)
    assert summary.processed == 1
    assert cv2.imread(str(tmp_path / "out" / "003" / "frontal_01.jpg")).shape == (224, 224, 3)
    again = run_align(AlignConfig(size=224), directory_source(src), tmp_path / "out", workers=0, progress=False)
    assert (again.processed, again.skipped) == (0, 1)


def test_resume_after_sigkill_gives_the_same_outputs(tmp_path):
    src = _cfp_tree(tmp_path / "in", identities=("004", "005", "006"), per_identity=4)  # 12 images
    args = ["--chunk-size", "2", "--batch-size", "1", "--workers", "0", "--no-progress"]
    cli = [sys.executable, "-m", "facepipe.cli", "align", str(src)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_align(AlignConfig(), directory_source(src), tmp_path / "ref", workers=0, batch_size=1, chunk_size=2, progress=False)

    out = tmp_path / "killed"
    parts = out / ".facepipe" / "parts"
    victim = subprocess.Popen([*cli, "--out", str(out), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("chunk-*.parquet"))) < 2:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = len(list(parts.glob("chunk-*.parquet")))
    assert 2 <= done_before < 6, "the run should have been killed mid-way"
    assert not (out / "manifest.parquet").exists()

    resumed = subprocess.run([*cli, "--out", str(out), *args], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({2 * done_before} already done)" in resumed.stdout
    assert _files(out) == _files(tmp_path / "ref")  # byte-identical crops: deterministic encoding
    assert read_manifest(out / "manifest.parquet") == read_manifest(tmp_path / "ref" / "manifest.parquet")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not list((out / ".facepipe" / "staging").iterdir())


def test_recordio_and_tar_sinks_are_deterministic_and_readable(tree, tmp_path):
    outputs = {}
    for sink in ("recordio", "tar"):
        for attempt in (1, 2):
            out = tmp_path / f"{sink}{attempt}"
            result = _run([str(tree), "--out", str(out), "--sink", sink, "--chunk-size", "3"])
            assert result.exit_code == 0, result.output
            outputs[sink, attempt] = _files(out)
        assert outputs[sink, 1] == outputs[sink, 2]
    rows = read_manifest(tmp_path / "recordio1" / "manifest.parquet")
    ok_rows = [row for row in rows if row.status == "ok"]
    # RecordIO: insightface layout, labels = identity folders in order of appearance (001, 002, top level)
    assert sorted(outputs["recordio", 1]) == ["labels.tsv", "train.idx", "train.rec"]
    assert outputs["recordio", 1]["labels.tsv"] == b"0\t001\n1\t002\n2\t\n"
    reader = RecordIOReader(tmp_path / "recordio1" / "train.rec")
    keys = reader.image_keys()
    assert len(keys) == len(ok_rows) == 7
    labels = [reader.read_image_record(k)[0].label[0] for k in keys]
    assert labels == [0.0] * 3 + [1.0] * 3 + [2.0]  # 3 CFP crops each, then t1 (mask_white has no face)
    # tar: one shard per chunk, members named as the mirror tree would name them
    shards = sorted(k for k in outputs["tar", 1] if k.endswith(".tar"))
    assert shards == ["shards/chunk-000000.tar", "shards/chunk-000001.tar", "shards/chunk-000002.tar"]
    members = {}
    for shard in shards:
        with tarfile.open(fileobj=io.BytesIO(outputs["tar", 1][shard])) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert sorted(members) == sorted(name for row in ok_rows for name in row.outputs)
    dir_out = tmp_path / "dir"
    _run([str(tree), "--out", str(dir_out)])
    assert members == _files(dir_out)  # same bytes whatever the sink


def test_recordio_source_keeps_identity_labels(tmp_path):
    rec = tmp_path / "train.rec"
    with InsightfaceDatasetWriter(rec) as writer:
        for label, identity in ((0, "007"), (0, "007"), (5, "008")):
            for name in sorted(os.listdir(shared_path(*CFP, identity, "frontal")))[:1]:
                writer.add(label, shared_path(*CFP, identity, "frontal", name).read_bytes())
    source = open_source(rec)
    assert [item.key for item in source.items()] == ["0/1.jpg", "0/2.jpg", "5/3.jpg"]
    run_align(AlignConfig(), source, tmp_path / "out", sink_kind="recordio", workers=0, progress=False)
    reader = RecordIOReader(tmp_path / "out" / "train.rec")
    assert [reader.read_image_record(k)[0].label[0] for k in reader.image_keys()] == [0.0, 0.0, 5.0]
    assert reader.read_image_record(0)[0].label == (4.0, 6.0)
    run_align(AlignConfig(), source, tmp_path / "dir", workers=0, progress=False)
    assert sorted(_files(tmp_path / "dir")) == ["0/1.jpg", "0/2.jpg", "5/3.jpg"]


def test_lfw_landmarks_file_alignment(tmp_path):
    landmarks = shared_path("lfw", "lfw_landmark_5pt_sphereface.txt")
    src = tmp_path / "lfw"
    (src / "Anthony_Hopkins").mkdir(parents=True)
    for name in ("Anthony_Hopkins_0001.jpg", "Anthony_Hopkins_0002.jpg"):
        shutil.copy(shared_path("lfw", name), src / "Anthony_Hopkins" / name)
    shutil.copy(shared_path(*CFP, "001", "frontal", "01.jpg"), src / "not_in_file.jpg")
    table = {line.split()[0]: line.split()[1:] for line in landmarks.read_text().splitlines()}
    for size, shape in (("112", (112, 112)), ("112x96", (112, 96))):
        out = tmp_path / size
        result = _run([str(src), "--out", str(out), "--landmarks", str(landmarks), "--size", size, "--format", "png"])
        assert result.exit_code == 0, result.output
        rows = {row.key: row for row in read_manifest(out / "manifest.parquet")}
        assert (rows["not_in_file.jpg"].status, rows["not_in_file.jpg"].reason) == ("no_face", "not in landmarks file")
        for key in ("Anthony_Hopkins/Anthony_Hopkins_0001.jpg", "Anthony_Hopkins/Anthony_Hopkins_0002.jpg"):
            points = np.array(table[key], np.float32).reshape(5, 2)
            assert np.array_equal(np.array(rows[key].landmarks[0]).reshape(5, 2), points)
            assert np.isnan(rows[key].boxes[0]).all()  # a landmarks file gives no box
            expected = norm_crop(read_image(src / key), points, size=shape if size == "112x96" else 112)
            written = cv2.imread(str(out / rows[key].outputs[0]), cv2.IMREAD_COLOR)
            assert written.shape[:2] == shape and np.array_equal(written, expected)


def test_ijbc_landmarks_file_format_with_faceness(tmp_path):
    golden = _golden_t1()
    src = tmp_path / "loose_crop"
    src.mkdir()
    shutil.copy(shared_path("images", "group", "t1.jpg"), src / "1.jpg")
    lines = ["1.jpg " + " ".join(f"{v:.3f}" for v in golden[0, 5:]) + " 0.873"]
    (tmp_path / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    config = AlignConfig(landmarks_file=str(tmp_path / "ijbc_name_5pts_score.txt"))
    run_align(config, directory_source(src), tmp_path / "out", workers=0, progress=False)
    row = read_manifest(tmp_path / "out" / "manifest.parquet")[0]
    assert row.status == "ok" and row.scores == [pytest.approx(0.873)]
    assert np.allclose(np.reshape(row.landmarks[0], -1), golden[0, 5:], atol=1e-3)


def test_padded_retry(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_path("images", "group", "mask_white.jpg"), src / "mask.jpg")
    shutil.copy(shared_path("images", "group", "Tom_Hanks_54745.png"), src / "tom.png")
    run_align(AlignConfig(retry_padded=True), directory_source(src), tmp_path / "out", workers=0, progress=False)
    rows = {row.key: row for row in read_manifest(tmp_path / "out" / "manifest.parquet")}
    assert (rows["mask.jpg"].status, rows["mask.jpg"].padded_retry) == ("no_face", True)
    assert (rows["tom.png"].status, rows["tom.png"].padded_retry) == ("ok", False)  # found without padding
    # the padded pass maps faces back into the original image: same face, same place
    worker = AlignWorker(AlignConfig(), directory_source(src))
    tom = read_image(src / "tom.png")
    padded, pad = pad_image(tom, 0.5)
    assert padded.shape == (224, 224, 3) and pad == 56
    plain, on_padded = worker.detector.detect([tom, padded])
    assert np.abs(on_padded[0].landmarks - plain[0].landmarks).min() > 50
    assert np.abs(on_padded[0].translated(-pad, -pad).landmarks - plain[0].landmarks).max() < 5  # another pass: ~3 px


def test_worker_processes_match_in_process(tree, tmp_path):
    source = file_list_source(_write_list(tree, tmp_path / "list.txt"))
    a = run_align(AlignConfig(), source, tmp_path / "pool", workers=2, batch_size=2, chunk_size=3, progress=False)
    b = run_align(AlignConfig(), source, tmp_path / "local", workers=0, batch_size=2, chunk_size=3, progress=False)
    assert a.counts == b.counts == {"ok": 7, "no_face": 1, "error": 0}
    rows_a = read_manifest(tmp_path / "pool" / "manifest.parquet")
    rows_b = read_manifest(tmp_path / "local" / "manifest.parquet")
    assert [(r.key, r.status, r.outputs) for r in rows_a] == [(r.key, r.status, r.outputs) for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert np.allclose(np.array(ra.landmarks), np.array(rb.landmarks), atol=1e-3)
    files_a, files_b = _files(tmp_path / "pool"), _files(tmp_path / "local")
    assert sorted(files_a) == sorted(files_b)
    for name in files_a:
        crop_a = cv2.imdecode(np.frombuffer(files_a[name], np.uint8), cv2.IMREAD_COLOR)
        crop_b = cv2.imdecode(np.frombuffer(files_b[name], np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(crop_a.astype(int) - crop_b).max() <= 2


def _write_list(tree: Path, list_file: Path) -> Path:
    paths = sorted(str(p) for p in tree.rglob("*.jpg"))
    list_file.write_text("# images\n" + "\n".join(paths) + "\n")
    return list_file


def test_file_list_entries_that_are_folders_or_missing_and_degenerate_landmarks(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    shutil.copy(shared_path(*CFP, "001", "frontal", "01.jpg"), tmp_path / "flat.jpg")
    (tmp_path / "list.txt").write_text("folder.jpg\nmissing.jpg\nflat.jpg\n")
    (tmp_path / "lm.txt").write_text("flat.jpg " + " ".join(["50"] * 10) + "\n")
    config = AlignConfig(landmarks_file=str(tmp_path / "lm.txt"))
    summary = run_align(config, file_list_source(tmp_path / "list.txt"), tmp_path / "out", workers=0, progress=False)
    assert summary.counts == {"ok": 0, "no_face": 0, "error": 3}
    rows = {row.key: (row.status, row.reason) for row in read_manifest(tmp_path / "out" / "manifest.parquet")}
    assert rows == {
        "folder.jpg": ("error", "is a directory"),
        "missing.jpg": ("error", "file not found"),
        "flat.jpg": ("error", "degenerate landmarks (all points coincide): cannot align"),
    }
