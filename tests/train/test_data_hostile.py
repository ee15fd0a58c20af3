import pytest

from facepipe.train.data import AnnotationError, read_annotations


def test_non_utf8_and_non_finite_label_txt_name_the_line(tmp_path):
    path = tmp_path / "label.txt"
    path.write_bytes(b"# a.jpg\n1 2 3 4\n# b\xff.jpg\n")
    with pytest.raises(AnnotationError, match=r"label.txt: line 3: not UTF-8"):
        read_annotations("label-txt", path, tmp_path)
    path.write_text("# a.jpg\n1 2 3 4\n1 2 nan 4\n")
    with pytest.raises(AnnotationError, match=r"label.txt:3: NaN or infinite"):
        read_annotations("label-txt", path, tmp_path)
    path.write_text("# a.jpg\n1 2 3 4\n")
    assert read_annotations("label-txt", path, tmp_path)[0].faces.boxes.tolist() == [[1, 2, 4, 6]]


def test_non_finite_jsonl_and_corrupt_mat(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"path": "a.jpg", "faces": [{"box": [1, 2, 3, 4]}]}\n{"path": "b.jpg", "faces": [{"box": [1, NaN, 3, 4]}]}\n')
    with pytest.raises(AnnotationError, match=r"train.jsonl:2: NaN or infinite"):
        read_annotations("jsonl", path, tmp_path)
    mat = tmp_path / "wider_face_train.mat"
    for damage in (b"", b"MATLAB 5.0 MAT-file" + b"\x00" * 200):
        mat.write_bytes(damage)
        with pytest.raises(AnnotationError, match="not a readable MATLAB file"):
            read_annotations("wider-mat", mat, tmp_path)
    from scipy.io import savemat

    savemat(mat, {"other": [1]})
    with pytest.raises(AnnotationError, match="not a WIDER FACE ground-truth"):
        read_annotations("wider-mat", mat, tmp_path)
