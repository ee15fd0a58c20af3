"""Real aligned face crops for the precision tests, made from a few shared CFP photos (no face data committed)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import shared_path


def _crops(detector, paths: list[Path]) -> np.ndarray:
    from facepipe.alignment.similarity import norm_crop
    from facepipe.evaluation.raw_pipeline import choose_face

    crops = []
    for path in paths:
        image = cv2.imread(str(path))
        face = choose_face(detector.detect([image])[0], image.shape)
        assert face is not None, path
        crops.append(norm_crop(image, face.landmarks))
    return np.stack(crops)


@pytest.fixture(scope="session")
def precision_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("facepipe-home")


@pytest.fixture(scope="session")
def cfp_crops(tmp_path_factory) -> dict[str, object]:
    """``calibration``: a folder of 12 aligned crops (people 1-6); ``crops``: 12 crops of other people (7-12)."""
    from facepipe.detection.base import create_detector

    root = shared_path("cfp", "cfp-dataset", "Data", "Images")  # skips when ../shared is absent
    detector = create_detector("retinaface")
    calibration = tmp_path_factory.mktemp("calibration")
    paths = [root / f"{i:03d}" / "frontal" / f"{n:02d}.jpg" for i in range(1, 7) for n in (1, 2)]
    for i, crop in enumerate(_crops(detector, paths)):
        cv2.imwrite(str(calibration / f"{i:02d}.png"), crop)
    probes = [root / f"{i:03d}" / kind / "01.jpg" for i in range(7, 13) for kind in ("frontal", "profile")]
    return {"calibration": calibration, "crops": _crops(detector, probes)}
