"""``facepipe detect`` end to end: JSON lines against the reference detections, bad files, folders, pictures."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.commands import detect as detect_module
from facepipe.detection import create_detector
from facepipe.io.images import ImageDecodeError, read_image
from tests.conftest import shared_path

CELEBRITY = "006_9135205d.jpg"  # reference scores 1.0, 0.987, 0.196, then < 0.04


@pytest.fixture(scope="module")
def golden_rows() -> dict[str, np.ndarray]:
    npz = np.load(shared_path("golden", "retinaface_mnet_shared.npz"))
    return {k: npz[k] for k in ("images/group/t1.jpg", f"images/celebrities/{CELEBRITY}", "images/group/mask_white.jpg")}


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """t1 and mask_white at the top, a celebrity in a subfolder, a corrupt JPEG, a text file named .jpg, a note."""
    folder = tmp_path / "photos"
    (folder / "people").mkdir(parents=True)
    shutil.copy(shared_path("images", "group", "t1.jpg"), folder / "t1.jpg")
    shutil.copy(shared_path("images", "group", "mask_white.jpg"), folder / "mask_white.jpg")
    shutil.copy(shared_path("images", "celebrities", CELEBRITY), folder / "people" / CELEBRITY)
    (folder / "corrupt.jpg").write_bytes(shared_path("images", "group", "t1.jpg").read_bytes()[:600])
    (folder / "notes.jpg").write_text("this is not a picture\n")
    (folder / "readme.txt").write_text("not an image extension: skipped\n")
    return folder


def _run(args: list[str]):
    result = CliRunner().invoke(main, ["detect", *args], catch_exceptions=False)
    return result


def _lines(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(r["path"]).name: r for r in records}


def _assert_matches_reference(faces: list[dict], rows: np.ndarray, threshold: float) -> None:
    expected = rows[rows[:, 4] >= threshold]
    assert len(faces) == len(expected)
    for face, row in zip(faces, expected):  # both in score order
        np.testing.assert_allclose(face["box"], row[:4], atol=0.5)
        np.testing.assert_allclose(np.asarray(face["landmarks"]).reshape(-1), row[5:], atol=0.5)
        assert face["score"] == pytest.approx(float(row[4]), abs=2e-4)


def test_detect_folder_with_bad_files(tmp_path, image_folder, golden_rows):
    out = tmp_path / "out" / "dets.jsonl"
    result = _run([str(image_folder), "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    records = _lines(out)
    assert sorted(records) == sorted(["t1.jpg", "mask_white.jpg", CELEBRITY, "corrupt.jpg", "notes.jpg"])
    # input order: sorted walk of the folder
    order = [Path(json.loads(line)["path"]).relative_to(image_folder).as_posix() for line in out.read_text().splitlines()]
    assert order == sorted(order)

    for bad in ("corrupt.jpg", "notes.jpg"):
        assert set(records[bad]) == {"path", "error"}
        with pytest.raises(ImageDecodeError) as reason:
            read_image(image_folder / bad)
        assert records[bad]["error"] == str(reason.value) != ""

    t1 = records["t1.jpg"]
    assert set(t1) == {"path", "width", "height", "faces"}
    assert (t1["width"], t1["height"]) == (1280, 886)
    for face in t1["faces"]:
        assert set(face) == {"box", "score", "landmarks"}
        assert len(face["box"]) == 4 and np.asarray(face["landmarks"]).shape == (5, 2)
        assert isinstance(face["score"], float)
    _assert_matches_reference(t1["faces"], golden_rows["images/group/t1.jpg"], 0.5)
    assert len(t1["faces"]) == 6
    assert records["mask_white.jpg"]["faces"] == []
    _assert_matches_reference(records[CELEBRITY]["faces"], golden_rows[f"images/celebrities/{CELEBRITY}"], 0.5)
    assert "5 images, 8 faces, 2 errors" in result.output
    assert [p.name for p in out.parent.iterdir()] == ["dets.jsonl"]  # no temporary file left


def test_threshold_and_explicit_files(tmp_path, image_folder, golden_rows):
    out = tmp_path / "dets.jsonl"
    celebrity = image_folder / "people" / CELEBRITY
    missing = image_folder / "no_such_file.jpg"
    result = _run([str(celebrity), str(missing), "--out", str(out), "--threshold", "0.1"])
    assert result.exit_code == 0, result.output
    records = _lines(out)
    _assert_matches_reference(records[CELEBRITY]["faces"], golden_rows[f"images/celebrities/{CELEBRITY}"], 0.1)
    assert len(records[CELEBRITY]["faces"]) == 3
    assert records["no_such_file.jpg"]["error"] == "file not found"


def test_visualize_writes_pictures_for_readable_images(tmp_path, image_folder):
    out, pictures = tmp_path / "dets.jsonl", tmp_path / "pictures"
    result = _run([str(image_folder), "--out", str(out), "--visualize", str(pictures)])
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(pictures).as_posix() for p in pictures.rglob("*") if p.is_file())
    assert written == sorted(["t1.jpg", "mask_white.jpg", f"people/{CELEBRITY}"])
    original = cv2.imread(str(image_folder / "t1.jpg"))
    drawn = cv2.imread(str(pictures / "t1.jpg"))
    assert drawn.shape == original.shape
    face = _lines(out)["t1.jpg"]["faces"][0]
    x1, y1, x2, y2 = (int(round(v)) for v in face["box"])
    # the box edge is drawn in the box colour (JPEG: approximately); far from faces the picture is unchanged
    edge = drawn[(y1 + y2) // 2, x1].astype(int)
    assert abs(edge[1] - 220) < 40 and edge[0] < 80 and edge[2] < 80
    assert np.abs(drawn[850:880, 20:60].astype(int) - original[850:880, 20:60]).mean() < 4


def test_same_file_names_from_two_folders_keep_their_folders(tmp_path, image_folder):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(image_folder / "t1.jpg", other / "t1.jpg")
    pictures = tmp_path / "pictures"
    result = _run([str(image_folder / "t1.jpg"), str(other), "--out", str(tmp_path / "d.jsonl"), "--visualize", str(pictures)])
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(pictures).as_posix() for p in pictures.rglob("*") if p.is_file())
    assert written == ["other/t1.jpg", "photos/t1.jpg"]  # the input tree below their common folder


def test_crash_leaves_no_complete_looking_output(tmp_path, image_folder, monkeypatch):
    out = tmp_path / "dets.jsonl"
    out.write_text("previous complete run\n")
    real = create_detector("retinaface")

    class CrashesOnSecondBatch:
        name = "crashing"

        def __init__(self) -> None:
            self.calls = 0

        def detect(self, images):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return real.detect(images)

    monkeypatch.setattr("facepipe.detection.create_detector", lambda *a, **k: CrashesOnSecondBatch())
    result = CliRunner().invoke(main, ["detect", str(image_folder), "--out", str(out), "--batch-size", "1"])
    assert result.exit_code != 0
    assert out.read_text() == "previous complete run\n"  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dets")] == []


def test_one_failing_image_does_not_sink_its_batch():
    real = create_detector("retinaface")
    small = np.full((64, 64, 3), 90, dtype=np.uint8)
    broken = np.zeros((0, 5, 3), dtype=np.uint8)  # an empty image the detector cannot process

    results = detect_module.detect_batch(real, [small, broken, small])
    assert results[0] == [] and results[2] == []
    assert isinstance(results[1], Exception)


def test_no_images_is_a_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["detect", str(tmp_path / "empty"), "--out", str(tmp_path / "d.jsonl")])
    assert result.exit_code == 2 and "no image files" in result.output
    assert not (tmp_path / "d.jsonl").exists()


def test_bad_weights_file_is_a_clear_error(tmp_path, image_folder):
    weights = tmp_path / "not_weights.pth"
    weights.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "d.jsonl"
    result = CliRunner().invoke(main, ["detect", str(image_folder / "t1.jpg"), "--out", str(out), "--weights", str(weights)])
    assert result.exit_code == 1 and "cannot build detector 'retinaface'" in result.output
    assert not out.exists()


def test_mtcnn_detector_through_the_cli(tmp_path, image_folder):
    out = tmp_path / "d.jsonl"
    result = _run([str(image_folder / "t1.jpg"), "--out", str(out), "--detector", "mtcnn", "--threshold", "0.95"])
    assert result.exit_code == 0, result.output
    faces = _lines(out)["t1.jpg"]["faces"]
    assert len(faces) == 6 and all(f["score"] >= 0.95 for f in faces)  # the 6 large faces (MTCNN golden)


def test_broken_link_and_upper_case_extension(tmp_path, image_folder):
    folder = tmp_path / "mixed"
    folder.mkdir()
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    shutil.copy(image_folder / "people" / CELEBRITY, folder / "FACE.PNG")  # JPEG bytes under a .PNG name
    out, pictures = tmp_path / "d.jsonl", tmp_path / "pictures"
    result = _run([str(folder), "--out", str(out), "--visualize", str(pictures)])
    assert result.exit_code == 0, result.output
    records = _lines(out)
    assert records["dangling.jpg"]["error"] == "broken symbolic link"
    assert len(records["FACE.PNG"]["faces"]) == 2
    assert cv2.imread(str(pictures / "FACE.PNG")).shape == (records["FACE.PNG"]["height"], records["FACE.PNG"]["width"], 3)
