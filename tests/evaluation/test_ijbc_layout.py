"""IJB-C meta files are checked where they are read: a bad value stops the run with one line naming the line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.evaluation.ijbc_layout import IJBMetaError, read_ijb_layout
from tests.evaluation.test_ijbc import write_meta


def small_meta(root: Path) -> Path:
    rng = np.random.default_rng(0)
    names = [f"{i}.jpg" for i in range(1, 6)]
    landmarks = rng.uniform(20, 90, (5, 5, 2)).astype(np.float32)
    write_meta(root, "IJBC", names, [1, 1, 2, 3, 3], [1, 2, 3, 4, 4], landmarks, rng.uniform(0.5, 1, 5), [1, 1], [2, 3], [1, 0])
    return root / "meta" / "ijbc_name_5pts_score.txt"


def replace_field(path: Path, line: int, column: int, value: str) -> None:
    lines = path.read_text().splitlines()
    fields = lines[line - 1].split(" ")
    fields[column] = value
    lines[line - 1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("column", "value", "what"),
    [(11, "nan", "the faceness score"), (11, "inf", "the faceness score"), (4, "inf", "a landmark coordinate"), (1, "-inf", "a landmark coordinate"), (7, "NaN", "a landmark coordinate")],
)
def test_non_finite_values_name_file_and_line(tmp_path, column, value, what):
    landmarks = small_meta(tmp_path)
    read_ijb_layout(tmp_path)  # the clean files read
    replace_field(landmarks, 3, column, value)
    with pytest.raises(IJBMetaError, match=rf"ijbc_name_5pts_score.txt line 3: {what} is not a finite number"):
        read_ijb_layout(tmp_path)


def test_blank_line_and_bad_label_name_the_line(tmp_path):
    landmarks = small_meta(tmp_path)
    lines = landmarks.read_text().splitlines()
    landmarks.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")
    with pytest.raises(IJBMetaError, match="ijbc_name_5pts_score.txt line 3: empty line"):
        read_ijb_layout(tmp_path)
    landmarks.write_text("\n".join(lines) + "\n")
    (tmp_path / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3 7\n")
    with pytest.raises(IJBMetaError, match="ijbc_template_pair_label.txt line 2: label 7"):
        read_ijb_layout(tmp_path)


def test_cli_reports_nan_faceness_as_one_line(tmp_path):
    replace_field(small_meta(tmp_path), 2, 11, "nan")
    result = CliRunner().invoke(main, ["eval", "ijbc", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "ijbc_name_5pts_score.txt line 2: the faceness score is not a finite number" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out" / "table.md").exists()
