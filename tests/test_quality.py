"""Quality measures are stored with every face: the align manifest per crop, the embedding manifest per row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from facepipe.cli import main
from facepipe.pipeline.manifest import read_manifest
from facepipe.quality import inter_ocular_distance, landmark_yaw, laplacian_sharpness
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for identity, index in (("001", 1), ("001", 2), ("002", 1)):
        (root / identity).mkdir(exist_ok=True)
        source = shared_path("cfp", "cfp-dataset", "Data", "Images", identity, "frontal", f"{index:02d}.jpg")
        (root / identity / f"{index:02d}.jpg").write_bytes(source.read_bytes())
    return root


def test_align_manifest_holds_each_crops_quality(tmp_path, photos):
    result = CliRunner().invoke(main, ["align", str(photos), "--out", str(tmp_path / "a"), "--workers", "0", "--no-progress",
                                       "--format", "png"])
    assert result.exit_code == 0, result.output
    for row in read_manifest(tmp_path / "a" / "manifest.parquet"):
        landmarks = np.array(row.landmarks, dtype=np.float64)
        assert len(row.inter_ocular) == len(row.yaw) == len(row.sharpness) == len(row.outputs) == 1
        assert row.inter_ocular == pytest.approx(inter_ocular_distance(landmarks).tolist(), rel=1e-6)
        assert row.yaw == pytest.approx(landmark_yaw(landmarks).tolist(), abs=1e-4)
        assert abs(row.yaw[0]) < 20  # frontal CFP photos
        import cv2

        crop = cv2.imread(str(tmp_path / "a" / row.outputs[0]))
        assert row.sharpness[0] == pytest.approx(laplacian_sharpness(crop[None])[0], rel=1e-5)


def test_embedding_manifest_holds_sharpness_and_with_detect_the_landmark_measures(tmp_path, photos):
    runner = CliRunner()
    result = runner.invoke(main, ["embed", str(photos), "--detect", "--out", str(tmp_path / "e"), "--no-progress"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "e" / "manifest.parquet")
    assert {"sharpness", "inter_ocular", "yaw"} <= set(table.columns)
    assert (table["sharpness"] > 0).all() and (table["inter_ocular"] > 10).all() and (table["yaw"].abs() < 20).all()
    landmarks = np.stack([np.stack(row) for row in table["landmarks"]]).astype(np.float64)
    np.testing.assert_allclose(table["inter_ocular"], inter_ocular_distance(landmarks), rtol=1e-5)
