"""insightface model packs: files found by their graphs (not names), used by create_detector / create_embedder."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from facepipe.detection.base import create_detector
from facepipe.embedding.base import create_embedder
from facepipe.models.insightface_pack import load_pack
from tests.conftest import shared_path


def task_graph(size: int, outputs: int) -> bytes:
    """A one-input one-output graph on ``size x size`` images, like insightface's landmark / gender-age models."""
    weight = numpy_helper.from_array(np.full((outputs, 3, size, size), 1e-4, dtype=np.float32), "w")
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["fc1"])]
    graph = helper.make_graph(
        nodes, "task", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, outputs])], [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]).SerializeToString()


@pytest.fixture(scope="module")
def scrfd_file():
    return shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx")


@pytest.fixture(scope="module")
def recognition_file():
    return shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")


@pytest.fixture
def pack(tmp_path, scrfd_file, recognition_file):
    """A buffalo-like folder whose file names lie: classification must come from the graphs."""
    folder = tmp_path / "buffalo_test"
    folder.mkdir()
    (folder / "w600k_r50.onnx").symlink_to(scrfd_file)  # the detector under a recognition name
    (folder / "det_10g.onnx").symlink_to(recognition_file)  # the recognition model under a detector name
    (folder / "2d106det.onnx").write_bytes(task_graph(192, 212))
    (folder / "genderage.onnx").write_bytes(task_graph(96, 3))
    (folder / "readme.txt").write_text("not a model")
    return folder


def test_pack_files_are_classified_by_graph(pack):
    found = load_pack(pack)
    assert found.detector.name == "w600k_r50.onnx"
    assert found.recognition.name == "det_10g.onnx"
    ignored = {m.path.name: m.description for m in found.ignored}
    assert set(ignored) == {"2d106det.onnx", "genderage.onnx"}
    assert ignored["2d106det.onnx"].startswith("106-point landmarks") and ignored["genderage.onnx"].startswith("gender/age")
    assert "SCRFD, strides 8/16/32, 2 anchor(s), with keypoints" in found.summary()
    assert "512-d embedding" in found.summary()


def test_create_detector_and_embedder_from_a_pack(pack, scrfd_file, recognition_file):
    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")), cv2.IMREAD_COLOR)
    from_pack = create_detector(pack=str(pack), intra_op_threads=1)
    from_file = create_detector("scrfd", weights=str(scrfd_file), intra_op_threads=1)
    assert from_pack.name == "scrfd"
    rows_pack, rows_file = from_pack.detect_rows([image])[0], from_file.detect_rows([image])[0]
    assert len(rows_pack) == 6
    np.testing.assert_array_equal(rows_pack, rows_file)

    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    embedder = create_embedder(pack=str(pack))
    assert embedder.embedding_size == 512
    np.testing.assert_allclose(embedder.embed(crops), create_embedder("onnx", weights=str(recognition_file)).embed(crops), rtol=1e-5, atol=1e-5)


def test_bad_packs_say_what_they_hold(tmp_path, pack, scrfd_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no SCRFD detector \\(no .onnx files\\)"):
        create_detector(pack=str(empty))
    only_tasks = tmp_path / "tasks"
    only_tasks.mkdir()
    (only_tasks / "genderage.onnx").write_bytes(task_graph(96, 3))
    with pytest.raises(ValueError, match="no 112x112 recognition model \\(genderage.onnx: gender/age"):
        create_embedder(pack=str(only_tasks))
    (pack / "scrfd_10g_bnkps.onnx").symlink_to(scrfd_file)
    with pytest.raises(ValueError, match="2 detector models"):
        load_pack(pack)
    with pytest.raises(FileNotFoundError):
        load_pack(tmp_path / "missing")
    with pytest.raises(ValueError, match="provides an SCRFD detector"):
        create_detector("mtcnn", pack=str(empty))
    with pytest.raises(ValueError, match="provides the ONNX embedder"):
        create_embedder("mobilefacenet", pack=str(empty))


def test_embed_with_a_pack_uses_its_detector_and_recognition_model(tmp_path, pack, recognition_file):
    """`embed --detect --pack` = SCRFD detection + the pack's recognition ONNX, as FaceAnalysis would run them."""
    import pandas as pd
    from click.testing import CliRunner

    from facepipe.cli import main

    photos = tmp_path / "photos" / "001"
    photos.mkdir(parents=True)
    for index in (1, 2):
        source = shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", f"{index:02d}.jpg")
        (photos / f"{index:02d}.jpg").write_bytes(source.read_bytes())
    result = CliRunner().invoke(main, ["embed", str(tmp_path / "photos"), "--detect", "--pack", str(pack), "--pad-ratio",
                                       "0.25", "--out", str(tmp_path / "emb"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "ignoring 2d106det.onnx" in result.output
    run = pd.read_json(tmp_path / "emb" / "run.json", typ="series")
    from pathlib import Path

    assert run["model"] == "onnx" and Path(run["weights"]).resolve() == Path(recognition_file).resolve()  # by graph
    table = pd.read_parquet(tmp_path / "emb" / "manifest.parquet")
    assert (table["status"] == "ok").all() and len(table) == 2 and (table["det_score"] > 0.5).all()
    result = CliRunner().invoke(main, ["embed", str(tmp_path / "photos"), "--detect", "--pack", str(pack),
                                       "--weights", str(recognition_file), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--pack or --weights" in result.output
