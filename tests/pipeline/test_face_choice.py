import numpy as np
import pytest

from facepipe.pipeline.face_choice import choose_faces
from facepipe.types import Face


def _face(x1, y1, x2, y2, score):
    return Face(np.array([x1, y1, x2, y2], np.float32), score, np.zeros((5, 2), np.float32))


FACES = [
    _face(0, 0, 10, 10, 0.99),  # best, small, top-left
    _face(40, 40, 60, 60, 0.90),  # centred in a 100x100 image
    _face(70, 0, 100, 40, 0.80),  # largest
    _face(0, 0, 90, 90, 0.30),  # huge but below the threshold
]


@pytest.mark.parametrize(
    "keep, expected", [("best", [0.99]), ("largest", [0.80]), ("center", [0.90]), ("all", [0.99, 0.90, 0.80])]
)
def test_keep_modes(keep, expected):
    chosen = choose_faces(FACES, (100, 100, 3), keep, min_score=0.5)
    assert [round(f.score, 2) for f in chosen] == expected


def test_threshold_and_empty():
    assert choose_faces(FACES, (100, 100, 3), "largest", min_score=0.995) == []
    assert choose_faces([], (100, 100, 3), "all") == []
    assert choose_faces(FACES, (100, 100, 3), "largest", min_score=0.0)[0].score == pytest.approx(0.30)
    with pytest.raises(ValueError, match="keep must be one of"):
        choose_faces(FACES, (100, 100, 3), "first")


def test_ties_go_to_the_earlier_face():
    twins = [_face(0, 0, 10, 10, 0.9), _face(20, 0, 30, 10, 0.9)]
    assert choose_faces(twins, (10, 30, 3), "largest")[0] is twins[0]
    assert choose_faces(twins, (10, 30, 3), "best")[0] is twins[0]
