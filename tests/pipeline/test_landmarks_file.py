import numpy as np
import pytest

from facepipe.pipeline.landmarks_file import LandmarksFileError, read_landmarks_file
from tests.conftest import shared_path


def test_sphereface_lfw_file():
    faces = read_landmarks_file(shared_path("lfw", "lfw_landmark_5pt_sphereface.txt"))
    assert len(faces) == 13233  # every LFW image (the last line has no newline)
    face = faces["Aaron_Eckhart/Aaron_Eckhart_0001.jpg"]
    assert np.array_equal(face.landmarks, [[107, 107], [147, 111], [124, 143], [103, 157], [139, 161]])
    assert face.score == 1.0 and np.isnan(face.box).all()


def test_ijbc_format_with_faceness(tmp_path):
    path = tmp_path / "ijbc_name_5pts_score.txt"
    path.write_text("1.jpg 46.06 62.03 87.79 60.32 68.85 77.66 52.16 99.88 86.80 98.36 0.9987\n"
                    "2.jpg 1 2 3 4 5 6 7 8 9 10 0.25\n")
    faces = read_landmarks_file(path)
    assert faces["1.jpg"].score == pytest.approx(0.9987)
    assert np.allclose(faces["1.jpg"].landmarks[4], [86.80, 98.36])
    assert np.array_equal(faces["2.jpg"].landmarks, np.arange(1, 11, dtype=np.float32).reshape(5, 2))


@pytest.mark.parametrize(
    "text, message",
    [
        ("a.jpg 1 2 3\n", "11 or 12 fields"),
        ("a.jpg 1 2 3 4 5 6 7 8 9 x\n", "non-numeric"),
        ("a.jpg 1 2 3 4 5 6 7 8 9 10\nb.jpg 1 2 3 4 5 6 7 8 9 10 0.5\n", "earlier lines have 11"),
        ("a.jpg 1 2 3 4 5 6 7 8 9 10\na.jpg 1 2 3 4 5 6 7 8 9 10\n", "listed twice"),
        ("\n", "empty"),
    ],
)
def test_malformed_files_are_refused_with_line_numbers(tmp_path, text, message):
    path = tmp_path / "lm.txt"
    path.write_text(text)
    with pytest.raises(LandmarksFileError, match=message):
        read_landmarks_file(path)


def test_missing_file():
    with pytest.raises(LandmarksFileError, match="not found"):
        read_landmarks_file("/nonexistent/landmarks.txt")
