import shutil

import pytest

from facepipe.evaluation import widerface as W
from tests.conftest import shared_path


def test_non_utf8_or_non_finite_predictions_name_file_and_line(tmp_path):
    path = tmp_path / "0_Parade" / "img.txt"
    path.parent.mkdir()
    path.write_bytes(b"img\n1\n1 2 3 4 0.\xff\n")
    with pytest.raises(W.WiderFormatError, match=r"img.txt: line 3: not UTF-8"):
        W.read_prediction_file(path)
    for bad in ("nan", "inf", "-inf"):
        path.write_text(f"img\n2\n1 2 3 4 0.5\n1 2 {bad} 4 0.5\n")
        with pytest.raises(W.WiderFormatError, match=r"img.txt:4: NaN or infinite"):
            W.read_predictions(tmp_path)
    path.write_text("img\n1\n1 2 3 4 0.5\n")
    assert W.read_prediction_file(path)[1].tolist() == [[1, 2, 3, 4, 0.5]]


@pytest.mark.parametrize("damage", [b"", b"MATLAB 5.0 MAT-file" + b"\x00" * 200, b"\x89PNG garbage" * 50])
def test_empty_or_corrupt_mat_gives_one_line(tmp_path, damage):
    for name in ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat"):
        shutil.copy(shared_path("widerface", name), tmp_path / name)
    (tmp_path / "wider_medium_val.mat").write_bytes(damage)
    with pytest.raises(W.WiderFormatError, match=r"wider_medium_val.mat: not a readable MATLAB file") as info:
        W.load_ground_truth(tmp_path)
    assert "\n" not in str(info.value)


def test_mat_of_another_layout_gives_one_line(tmp_path):
    from scipy.io import savemat

    for name in ("wider_face_val.mat", "wider_easy_val.mat", "wider_medium_val.mat", "wider_hard_val.mat"):
        savemat(tmp_path / name, {"something": [1, 2, 3]})
    with pytest.raises(W.WiderFormatError, match="not the WIDER FACE val ground truth"):
        W.load_ground_truth(tmp_path)
