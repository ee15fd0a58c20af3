"""``detect --visualize``: marks sized to each face, the input tree mirrored, unwritable pictures reported."""

from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.commands.detect import collect_inputs
from facepipe.types import Face
from facepipe.visualize import BOX_COLOR, MIN_LABELLED_SIDE, draw_faces
from tests.conftest import shared_path


def _square_face(x: float, y: float, side: float) -> Face:
    s = side
    landmarks = [[x + 0.3 * s, y + 0.4 * s], [x + 0.7 * s, y + 0.4 * s], [x + 0.5 * s, y + 0.6 * s],
                 [x + 0.35 * s, y + 0.8 * s], [x + 0.65 * s, y + 0.8 * s]]
    return Face([x, y, x + s, y + s], 0.9, landmarks)


def _changed_rows_above(drawn: np.ndarray, plain: np.ndarray, x: int, y: int, side: int) -> int:
    """How many rows above the box top changed where the score label goes."""
    above = (drawn[:y, x:x + side] != plain[:y, x:x + side]).any(axis=(1, 2))
    return int(above.sum())


def test_labels_and_lines_scale_with_the_face_and_small_faces_get_no_label() -> None:
    image = np.full((400, 600, 3), 128, np.uint8)
    small, large = _square_face(50, 200, MIN_LABELLED_SIDE - 10), _square_face(300, 150, 200)
    plain = draw_faces(image, [small, large], show_scores=False)
    drawn = draw_faces(image, [small, large], show_scores=True)
    assert _changed_rows_above(drawn, plain, 50, 200, MIN_LABELLED_SIDE - 10) == 0  # no label on the small face
    label_rows = _changed_rows_above(drawn, plain, 300, 150, 200)
    assert 30 <= label_rows <= 60  # about a fifth of the 200 px face
    # Box lines: 1 px on the small face, several on the large one.
    assert (plain[215, 48:56] == BOX_COLOR).all(axis=1).sum() == 1
    assert (plain[250, 300:310] == BOX_COLOR).all(axis=1).sum() >= 3


def test_visualize_names_mirror_the_input_tree(tmp_path) -> None:
    for folder in ("a/x", "b/x", "b"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "p01.jpg").write_bytes(b"")
    relative = [i.relative.as_posix() for i in collect_inputs([tmp_path / "a", tmp_path / "b"])]
    assert relative == ["a/x/p01.jpg", "b/p01.jpg", "b/x/p01.jpg"]
    only_one = [i.relative.as_posix() for i in collect_inputs([tmp_path / "b"])]
    assert only_one == ["p01.jpg", "x/p01.jpg"]
    twice = [i.relative.as_posix() for i in collect_inputs([tmp_path / "b" / "p01.jpg", tmp_path / "b" / "p01.jpg"])]
    assert twice == ["p01.jpg", "p01_1.jpg"]


def test_a_picture_that_cannot_be_written_is_a_line_not_a_traceback(tmp_path) -> None:
    folder = tmp_path / "in"
    (folder / "blocked").mkdir(parents=True)
    long_name = "x" * 240 + ".jpg"  # its temporary name would be too long unless shortened: written all the same
    shutil.copy(shared_path("images", "group", "t1.jpg"), folder / long_name)
    shutil.copy(shared_path("images", "group", "t1.jpg"), folder / "blocked" / "t1.jpg")
    out, pictures = tmp_path / "d.jsonl", tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "blocked").write_bytes(b"a file where the mirrored folder should go")
    result = CliRunner().invoke(main, ["detect", str(folder), "--out", str(out), "--visualize", str(pictures)])
    assert result.exit_code == 0, result.output
    records = {json.loads(line)["path"].split("/")[-1]: json.loads(line) for line in out.read_text().splitlines()}
    assert "cannot write" in records["t1.jpg"]["visualize_error"]
    assert records[long_name]["faces"] == records["t1.jpg"]["faces"]  # the detections are still reported
    assert "visualize_error" not in records[long_name] and (pictures / long_name).is_file()
    assert "1 pictures could not be written" in result.output
    assert "Traceback" not in result.output


def test_an_unusable_visualize_folder_is_one_usage_error(tmp_path) -> None:
    image = tmp_path / "t1.jpg"
    shutil.copy(shared_path("images", "group", "t1.jpg"), image)
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["detect", str(image), "--out", str(tmp_path / "d.jsonl"), "--visualize", str(blocker / "v")])
    assert result.exit_code == 2 and "--visualize" in result.output and "Traceback" not in result.output
