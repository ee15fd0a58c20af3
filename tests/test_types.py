import numpy as np
import pytest

from facepipe.types import Face, faces_from_rows, faces_to_rows


def test_face_round_trips_through_row_and_dict():
    row = np.arange(15, dtype=np.float32) + 0.25
    face = Face.from_row(row)
    assert face.box.tolist() == [0.25, 1.25, 2.25, 3.25]
    assert face.score == pytest.approx(4.25)
    assert face.landmarks.shape == (5, 2)
    assert np.array_equal(face.to_row(), row)
    again = Face.from_dict(face.to_dict())
    assert np.allclose(again.to_row(), row, atol=1e-3)
    assert np.array_equal(faces_to_rows(faces_from_rows(np.stack([row, row]))), np.stack([row, row]))
    assert faces_to_rows([]).shape == (0, 15)


def test_face_geometry_and_transforms():
    face = Face(box=[10, 20, 50, 100], score=0.9, landmarks=np.zeros((5, 2)) + [30, 60])
    assert face.width == 40 and face.height == 80 and face.area == 3200
    assert face.center == (30.0, 60.0)
    scaled = face.scaled(0.5)
    assert scaled.box.tolist() == [5, 10, 25, 50] and scaled.landmarks[0].tolist() == [15, 30]
    moved = face.translated(1, 2)
    assert moved.box.tolist() == [11, 22, 51, 102] and moved.landmarks[0].tolist() == [31, 62]


@pytest.mark.parametrize("box, landmarks", [([1, 2, 3], np.zeros((5, 2))), ([1, 2, 3, 4], np.zeros((4, 2)))])
def test_face_rejects_bad_shapes(box, landmarks):
    with pytest.raises(ValueError):
        Face(box=box, score=1.0, landmarks=landmarks)
