"""SCRFD: parity with insightface 0.7.3 goldens, every graph layout against a re-statement, batching, bad graphs."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from facepipe.detection.backends import onnxruntime_session
from facepipe.detection.base import DETECTOR_NAMES, create_detector
from facepipe.detection.box_ops import nms
from facepipe.detection.scrfd import ScrfdDetector, ScrfdOnnxBackend, ScrfdSettings, create_scrfd, make_batch_dynamic, scrfd_layout
from facepipe.types import Face
from tests.conftest import REPO_ROOT, shared_path

WEIGHTS = ("weights", "scrfd", "scrfd_2.5g_bnkps.onnx")
ODD_HEIGHT = "widerface/val_images/12--Group/12_Group_Group_12_Group_Group_12_28.jpg"


def _load_reference():
    spec = importlib.util.spec_from_file_location("insightface_scrfd", REPO_ROOT / "eval" / "insightface_scrfd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()


def read(key: str) -> np.ndarray:
    return cv2.imread(str(shared_path(*key.split("/"))), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def weights() -> str:
    return str(shared_path(*WEIGHTS))


@pytest.fixture(scope="module")
def detector(weights) -> ScrfdDetector:
    return create_scrfd(weights, intra_op_threads=1)


@pytest.fixture(scope="module")
def golden_t050():
    return np.load(shared_path("golden", "scrfd_2.5g_shared_t050.npz"))


@pytest.fixture(scope="module")
def golden_t002():
    return np.load(shared_path("golden", "scrfd_2.5g_shared_t002.npz"))


def golden_keys(golden) -> list[str]:
    return sorted(k for k in golden.files if k != "__meta__")


def representative_keys(golden, step: int) -> list[str]:
    keys = golden_keys(golden)
    chosen = [k for k in ("images/group/t1.jpg", "images/group/mask_white.jpg", "images/group/Tom_Hanks_54745.png", ODD_HEIGHT) if k in keys]
    chosen += [k for k in keys if k.startswith("images/celebrities/")][::4]
    chosen += [k for k in keys if k.startswith("widerface/")][::step]
    return list(dict.fromkeys(chosen))


def assert_golden_parity(detector: ScrfdDetector, golden, keys: list[str]) -> None:
    """Same rows in the same order: boxes and points within 0.01 px, scores within 1e-5 (batched, mixed sizes)."""
    rows = detector.detect_rows([read(k) for k in keys])
    for key, ours in zip(keys, rows):
        expected = golden[key]
        assert ours.dtype == np.float32 and ours.shape == expected.shape, (key, ours.shape, expected.shape)
        if len(expected):
            assert np.abs(ours[:, 4] - expected[:, 4]).max() <= 1e-5, key
            coordinates = np.r_[0:4, 5:15]
            assert np.abs(ours[:, coordinates] - expected[:, coordinates]).max() <= 0.01, key


# ------------------------------------------------------------------------------------- golden parity
def test_parity_with_insightface_at_the_faceanalysis_default(detector, golden_t050):
    keys = representative_keys(golden_t050, step=14)
    assert 25 <= len(keys) <= 40
    assert_golden_parity(detector.with_settings(batch_size=8), golden_t050, keys)


def test_parity_with_insightface_at_the_wider_threshold(detector, golden_t002):
    keys = golden_keys(golden_t002)[::40]
    assert_golden_parity(detector.with_settings(threshold=0.02), golden_t002, keys)


@pytest.mark.slow
def test_parity_with_insightface_on_all_360_images(detector, golden_t050):
    keys = golden_keys(golden_t050)
    assert len(keys) == 360
    for start in range(0, len(keys), 16):
        assert_golden_parity(detector.with_settings(batch_size=16), golden_t050, keys[start : start + 16])


@pytest.mark.slow
def test_parity_with_insightface_on_all_323_wider_images_at_002(detector, golden_t002):
    keys = golden_keys(golden_t002)
    assert len(keys) == 323
    for start in range(0, len(keys), 16):
        assert_golden_parity(detector.with_settings(threshold=0.02, batch_size=16), golden_t002, keys[start : start + 16])


def test_t1_faces_and_faces_api(detector, golden_t050):
    faces = detector.detect([read("images/group/t1.jpg")])[0]
    assert all(isinstance(f, Face) for f in faces) and len(faces) == len(golden_t050["images/group/t1.jpg"]) == 6
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    assert detector.detect([read("images/group/mask_white.jpg")]) == [[]]
    assert detector.detect([]) == []
    assert "scrfd" in DETECTOR_NAMES


# ------------------------------------------------------------------------------------------- batching
def test_batch_one_graph_is_made_batch_dynamic_with_equal_outputs(weights):
    backend = ScrfdOnnxBackend(weights, intra_op_threads=1)
    model = onnx.load(weights)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the file is a batch-1 export
    assert backend.batched
    original = onnxruntime_session(weights, intra_op_threads=1)
    detector = ScrfdDetector(backend)
    images = [read("images/group/t1.jpg"), read(ODD_HEIGHT), read("images/celebrities/Elon_Musk.jpg")]
    batch = detector.preprocess(images)
    batched = backend(batch)
    for j in range(len(images)):
        single = original.run(None, {"input.1": batch[j : j + 1]})
        for ours, theirs in zip(batched, single):
            assert ours[j].shape == theirs.shape
            np.testing.assert_allclose(ours[j], theirs, rtol=1e-5, atol=1e-5)


def test_batched_over_mixed_sizes_equals_one_by_one(detector):
    t1, group = read("images/group/t1.jpg"), read(ODD_HEIGHT)
    images = [t1, group, t1[:300], cv2.resize(group, (321, 200)), group[::-1].copy()]
    for settings in ({}, {"det_size": "auto"}, {"scale": "original"}):
        tuned = detector.with_settings(batch_size=3, **settings)
        chosen = images if not settings else images[1:4]
        batched = tuned.detect_rows(chosen)
        for image, rows in zip(chosen, batched):
            alone = tuned.detect_rows([image])[0]
            assert rows.shape == alone.shape, settings
            assert np.abs(rows - alone).max(initial=0) <= 1e-4, settings


# ----------------------------------------------------------------------------------------- options
def test_settings_are_checked():
    assert ScrfdSettings(det_size="640x480").det_sizes == ((640, 480),)
    assert ScrfdSettings(det_size=320).det_sizes == ((320, 320),)
    assert ScrfdSettings(det_size=[256, 128]).det_sizes == ((256, 128),)
    assert ScrfdSettings(det_size="auto").det_sizes == ((128, 128), (640, 640))
    assert ScrfdSettings(threshold="0.3").threshold == 0.3
    for bad in ({"det_size": 100}, {"det_size": "big"}, {"scale": "fixed"}, {"threshold": 2}, {"batch_size": 0}, {"nms_threshold": "x"}):
        with pytest.raises(ValueError):
            ScrfdSettings(**bad)


def test_factory_needs_weights_and_refuses_unknown_options(weights):
    with pytest.raises(ValueError, match="needs an insightface SCRFD"):
        create_detector("scrfd")
    with pytest.raises(TypeError, match="unknown SCRFD option"):
        create_detector("scrfd", weights=weights, top_k=5)
    with pytest.raises(FileNotFoundError):
        create_detector("scrfd", weights="/no/such/file.onnx")


def test_original_scale_runs_the_image_unresized(detector):
    image = read("images/group/t1.jpg")[:480, :640].copy()
    original = detector.with_settings(scale="original").detect_rows([image])[0]
    same_size = detector.with_settings(det_size=(640, 480)).detect_rows([image])[0]  # letterbox factor 1
    assert len(original) >= 1
    np.testing.assert_array_equal(original, same_size)
    # an image whose sides are not multiples of 32 is padded, never resized: its faces keep their pixels
    odd = image[:470, :630].copy()
    padded = detector.with_settings(scale="original", threshold=0.5).detect_rows([odd])[0]
    assert detector.with_settings(scale="original").preprocess([odd]).shape == (1, 3, 480, 640)
    assert len(padded) >= 1 and padded[:, 2].max() <= 640 and padded[:, 3].max() <= 480


def test_auto_mode_merges_128_and_640_candidates_in_one_nms(detector):
    image = read("images/group/t1.jpg")
    merged = detector.with_settings(det_size="auto").detect_rows([image])[0]
    candidates = np.concatenate([
        detector.with_settings(det_size=size, nms_threshold=1.0).detect_rows([image])[0] for size in (128, 640)
    ])
    candidates = candidates[candidates[:, 4].argsort()[::-1]]
    np.testing.assert_array_equal(merged, candidates[nms(candidates, 0.4)])
    assert (merged[:, 4] >= 0.5).sum() >= 6


# --------------------------------------------------------------------------- other layouts (generated)
def tiny_scrfd(n_outputs: int, batched: bool, seed: int = 0, head_perm: list[int] | None = None) -> onnx.ModelProto:
    """A small SCRFD-shaped graph: per stride an average pool and a 1x1 conv per head, insightface's head order
    and output shapes (batch-1 exports: Transpose [2, 3, 0, 1] + Reshape [-1, C]; batched: (N, anchors, C))."""
    fmc, strides, anchors, keypoints = reference.LAYOUTS[n_outputs]
    rng = np.random.default_rng(seed)
    batch = "N" if batched else 1
    nodes, initializers, outputs = [], [], []
    for stride in strides:
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{stride}"], kernel_shape=[stride, stride], strides=[stride, stride]))
    heads = [("score", 1), ("bbox", 4)] + ([("kps", 10)] if keypoints else [])
    for head, width in heads:
        for stride in strides:
            name = f"{head}{stride}"
            weight = rng.normal(0, 1.5 if head == "score" else 0.5, (anchors * width, 3, 1, 1)).astype(np.float32)
            bias = np.full(anchors * width, -1.0 if head == "score" else 1.0, dtype=np.float32)
            initializers += [numpy_helper.from_array(weight, f"{name}.w"), numpy_helper.from_array(bias, f"{name}.b")]
            nodes.append(helper.make_node("Conv", [f"pool{stride}", f"{name}.w", f"{name}.b"], [f"{name}.conv"]))
            perm, target = ([0, 2, 3, 1], [0, -1, width]) if batched else (head_perm or [2, 3, 0, 1], [-1, width])
            initializers.append(numpy_helper.from_array(np.array(target, dtype=np.int64), f"{name}.shape"))
            nodes.append(helper.make_node("Transpose", [f"{name}.conv"], [f"{name}.t"], perm=perm))
            reshaped = f"{name}.r" if head == "score" else name
            nodes.append(helper.make_node("Reshape", [f"{name}.t", f"{name}.shape"], [reshaped]))
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [reshaped], [name]))
            dims = [batch, "anchors", width] if batched else ["anchors", width]
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, "H", "W"])
    graph = helper.make_graph(nodes, "tiny_scrfd", [image], outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("n_outputs", [6, 9, 10, 15])
@pytest.mark.parametrize("batched", [False, True])
def test_every_layout_decodes_as_insightface(n_outputs, batched):
    model = tiny_scrfd(n_outputs, batched, seed=n_outputs)
    data = model.SerializeToString()
    layout = scrfd_layout(model)
    assert (layout.levels, layout.keypoints) == (3 if n_outputs in (6, 9) else 5, n_outputs in (9, 15))
    backend = ScrfdOnnxBackend(data, intra_op_threads=1)
    assert backend.batched  # batch-1 exports are rewritten, batched ones taken as they are
    detector = ScrfdDetector(backend, ScrfdSettings(threshold=0.6, det_size=256, batch_size=3))
    theirs = reference.InsightfaceScrfd(onnxruntime_session(data, intra_op_threads=1), det_thresh=0.6, det_size=(256, 256))
    t1, group = read("images/group/t1.jpg"), read(ODD_HEIGHT)
    images = [t1, group, cv2.resize(t1, (200, 300)), group[:100]]
    for image, ours in zip(images, detector.detect_rows(images)):
        expected = reference.reference_rows(theirs, image)
        assert len(expected) > 0 and ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)  # NaN landmarks compare equal
        assert np.isnan(ours[:, 5:]).all() != layout.keypoints


def test_batch_dynamic_rewrite_keeps_each_image_anchor_order():
    model = tiny_scrfd(15, batched=False, seed=3)
    dynamic = onnxruntime_session(make_batch_dynamic(model).SerializeToString(), intra_op_threads=1)
    single = onnxruntime_session(model.SerializeToString(), intra_op_threads=1)
    probe = np.random.default_rng(1).uniform(-1, 1, (3, 3, 128, 256)).astype(np.float32)
    batched = dynamic.run(None, {"input.1": probe})
    for j in range(3):
        for ours, theirs in zip(batched, single.run(None, {"input.1": probe[j : j + 1]})):
            np.testing.assert_allclose(ours[j], theirs, rtol=1e-6, atol=1e-6)


def test_a_head_that_cannot_be_rewritten_runs_images_one_at_a_time():
    # Transpose [3, 2, 0, 1] (columns before rows) is a valid batch-1 export the rewrite does not know.
    data = tiny_scrfd(9, batched=False, seed=5, head_perm=[3, 2, 0, 1]).SerializeToString()
    backend = ScrfdOnnxBackend(data, intra_op_threads=1)
    assert not backend.batched
    detector = ScrfdDetector(backend, ScrfdSettings(threshold=0.6, det_size=128, batch_size=4))
    theirs = reference.InsightfaceScrfd(onnxruntime_session(data, intra_op_threads=1), det_thresh=0.6, det_size=(128, 128))
    t1 = read("images/group/t1.jpg")
    images = [t1, cv2.resize(t1, (100, 160))]
    for image, ours in zip(images, detector.detect_rows(images)):
        expected = reference.reference_rows(theirs, image)
        assert len(expected) > 0 and ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ bad graphs
def recognition_graph() -> bytes:
    weight = numpy_helper.from_array(np.ones((8, 3, 112, 112), dtype=np.float32) * 1e-3, "w")
    nodes = [helper.make_node("Conv", ["data", "w"], ["c"]), helper.make_node("Flatten", ["c"], ["fc1"])]
    graph = helper.make_graph(
        nodes, "arcface", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 8])], [weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]).SerializeToString()


def test_graphs_that_are_not_scrfd_fail_with_one_line(tmp_path):
    (tmp_path / "w600k_r50.onnx").write_bytes(recognition_graph())
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not an onnx file at all" * 10)
    cases = {
        tmp_path / "w600k_r50.onnx": r"not a SCRFD graph: expected 6, 9, 10 or 15 outputs.*found input data 1x3x112x112; 1 output\(s\) 1x8",
        shared_path("weights", "retinaface", "retinaface_mnet025_tiny.onnx"): r"not a SCRFD graph.*3 output\(s\)",
        tmp_path / "garbage.onnx": "cannot read it as ONNX",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as caught:
            create_detector("scrfd", weights=str(path))
        assert "\n" not in str(caught.value)
        assert str(caught.value).startswith(path.name)


def test_fixed_size_graph_takes_its_own_size_only():
    model = tiny_scrfd(9, batched=False)
    for dim, size in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], (256, 256)):
        dim.ClearField("dim_param")
        dim.dim_value = size
    backend = ScrfdOnnxBackend(model.SerializeToString(), intra_op_threads=1)
    assert backend.input_size == (256, 256)
    assert ScrfdDetector(backend).settings.det_sizes == ((256, 256),)  # det_size defaults to the graph's
    with pytest.raises(ValueError, match="takes only 256x256"):
        ScrfdDetector(backend, ScrfdSettings(det_size=640))
    with pytest.raises(ValueError, match="multiple of this graph's stride 128"):
        ScrfdDetector(ScrfdOnnxBackend(tiny_scrfd(10, batched=True).SerializeToString()), ScrfdSettings(det_size=(640, 480)))


def test_defaults_are_the_goldens_settings(golden_t050, detector):
    params = json.loads(str(golden_t050["__meta__"]))["params"]
    settings = detector.settings
    assert settings.det_sizes == (tuple(params["input_size"]),) and settings.scale == "letterbox"
    assert (settings.threshold, settings.nms_threshold) == (params["det_thresh"], params["nms_thresh"])
