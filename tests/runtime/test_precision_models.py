"""bf16 / int8 embedders and detectors against fp32 on real aligned CFP crops (skipped where the CPU lacks them)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from facepipe.runtime import cpu
from facepipe.runtime.cpu import PrecisionError, unsupported_reason
from tests.conftest import shared_path

# Documented floors (README "Reduced precision"): measured minima on CFP crops were 0.995 (bf16) and 0.967 (int8).
BF16_COSINE_FLOOR = 0.99
INT8_COSINE_FLOOR = 0.95

needs_bf16 = pytest.mark.skipif(unsupported_reason("bf16") is not None, reason=str(unsupported_reason("bf16")))
needs_int8 = pytest.mark.skipif(unsupported_reason("int8") is not None, reason=str(unsupported_reason("int8")))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


@pytest.fixture
def home(precision_home, monkeypatch):
    monkeypatch.setenv("FACEPIPE_HOME", str(precision_home))
    return precision_home


@pytest.fixture
def mobilefacenet_fp32(home):
    from facepipe.embedding.base import create_embedder

    return create_embedder("mobilefacenet", threads=1)


def test_fp32_precision_is_the_default_path(home, cfp_crops, mobilefacenet_fp32):
    from facepipe.embedding.base import create_embedder

    explicit = create_embedder("mobilefacenet", threads=1, precision="fp32")
    assert explicit.precision == mobilefacenet_fp32.precision == "fp32"
    crops = cfp_crops["crops"]
    np.testing.assert_array_equal(explicit.embed(crops), mobilefacenet_fp32.embed(crops))


@needs_bf16
def test_bf16_mobilefacenet_is_close_to_fp32(home, cfp_crops, mobilefacenet_fp32):
    from facepipe.embedding.base import create_embedder

    bf16 = create_embedder("mobilefacenet", threads=1, precision="bf16")
    assert bf16.precision == "bf16"
    crops = cfp_crops["crops"]
    cosine = _cosines(bf16.embed(crops), mobilefacenet_fp32.embed(crops))
    assert cosine.min() >= BF16_COSINE_FLOOR
    assert cosine.mean() < 1.0 - 1e-7  # really ran in reduced precision


@needs_bf16
def test_bf16_onnx_embedder_is_close_to_fp32(home, cfp_crops):
    from facepipe.embedding.onnx_embedder import create_onnx_embedder

    weights = shared_path("weights", "mobilefacenet", "faceplugin_fr_feature_512d.onnx")
    fp32 = create_onnx_embedder(weights, preset="faceplugin", threads=1)
    bf16 = create_onnx_embedder(weights, preset="faceplugin", threads=1, precision="bf16")
    crops = cfp_crops["crops"]
    assert _cosines(bf16.embed(crops), fp32.embed(crops)).min() >= BF16_COSINE_FLOOR


@needs_int8
def test_int8_is_calibrated_once_per_model_and_data(home, cfp_crops, mobilefacenet_fp32, tmp_path):
    import shutil

    from facepipe.embedding.base import create_embedder
    from facepipe.runtime.quantize import int8_cache_dir

    with pytest.raises(PrecisionError, match="facepipe quantize"):
        create_embedder("mobilefacenet", threads=1, precision="int8")  # never calibrated: one clear line
    calibration = cfp_crops["calibration"]
    int8 = create_embedder("mobilefacenet", threads=1, precision="int8", calibrate=str(calibration))
    assert int8.precision == "int8"
    crops = cfp_crops["crops"]
    cosine = _cosines(int8.embed(crops), mobilefacenet_fp32.embed(crops))
    assert cosine.min() >= INT8_COSINE_FLOOR

    made = sorted(int8_cache_dir().glob("*.onnx"))
    assert len(made) == 1
    stamp = made[0].stat().st_mtime_ns
    again = create_embedder("mobilefacenet", threads=1, precision="int8")  # the recorded calibration, no recalibration
    assert sorted(int8_cache_dir().glob("*.onnx")) == made and made[0].stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.embed(crops[:2]), int8.embed(crops[:2]))

    other = tmp_path / "other"
    shutil.copytree(calibration, other)
    (sorted(other.iterdir())[0]).unlink()  # different data -> a second cached model
    create_embedder("mobilefacenet", threads=1, precision="int8", calibrate=str(other))
    assert len(list(int8_cache_dir().glob("*.onnx"))) == 2


@needs_int8
def test_quantize_command_reports_the_cached_model(home, cfp_crops):
    from facepipe.cli import main

    runner = CliRunner()
    args = ["quantize", "--model", "mobilefacenet", "--calibrate", str(cfp_crops["calibration"]), "--threads", "1"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    second = runner.invoke(main, args)
    assert second.output == first.output and "int8 mobilefacenet:" in first.output
    path = first.output.split(": ", 1)[1].split(" (", 1)[0]
    assert path.endswith(".onnx") and (home / "int8") in Path(path).parents


def test_quantize_command_needs_enough_crops(home, tmp_path, monkeypatch):
    from facepipe.cli import main

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))  # any CPU: reach the data check
    result = CliRunner().invoke(main, ["quantize", "--model", "mobilefacenet", "--calibrate", str(tmp_path)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "at least 8" in result.output
    assert "Traceback" not in result.output


def test_detect_without_bf16_fails_with_one_line(home, monkeypatch, tmp_path):
    from facepipe.cli import main

    image = shared_path("images", "group", "t1.jpg")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
    result = CliRunner().invoke(main, ["detect", str(image), "--out", str(tmp_path / "d.jsonl"), "--precision", "bf16"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert lines == [lines[0]] and "avx512_bf16" in lines[0], result.output
    assert not (tmp_path / "d.jsonl").exists()


def test_auto_falls_back_to_fp32_on_a_cpu_without_the_flags(home, monkeypatch, cfp_crops, mobilefacenet_fp32):
    from facepipe.detection.base import create_detector
    from facepipe.embedding.base import create_embedder

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    embedder = create_embedder("mobilefacenet", threads=1, precision="auto")
    assert embedder.precision == "fp32"
    np.testing.assert_array_equal(embedder.embed(cfp_crops["crops"][:3]), mobilefacenet_fp32.embed(cfp_crops["crops"][:3]))
    assert create_detector("retinaface", precision="auto").backend.precision == "fp32"


def test_detectors_refuse_int8(home):
    from facepipe.detection.base import create_detector

    with pytest.raises(PrecisionError, match="int8 is for embedders"):
        create_detector("retinaface", precision="int8")
    with pytest.raises(click.UsageError, match="RetinaFace"):
        from facepipe.commands.detect import detector_options

        detector_options("mtcnn", 8, precision="bf16")


@needs_bf16
def test_bf16_retinaface_finds_the_same_faces(home):
    import cv2

    from facepipe.detection.base import create_detector

    image = cv2.imread(str(shared_path("images", "group", "t1.jpg")))
    fp32 = create_detector("retinaface", intra_op_threads=1)
    bf16 = create_detector("retinaface", intra_op_threads=1, precision="bf16")
    assert bf16.backend.precision == "bf16" and bf16.backend.name == "openvino-cpu-bf16"
    a, b = fp32.detect([image])[0], bf16.detect([image])[0]
    assert len(a) == len(b) == 6
    boxes_a = np.array(sorted(f.box.tolist() for f in a))
    boxes_b = np.array(sorted(f.box.tolist() for f in b))
    assert np.abs(boxes_a - boxes_b).max() < 3.0  # pixels, on faces ~60-90 px wide
    assert json.dumps([round(float(f.score), 1) for f in sorted(a, key=lambda f: f.box[0])]) == json.dumps(
        [round(float(f.score), 1) for f in sorted(b, key=lambda f: f.box[0])]
    )


def test_align_refuses_int8_and_mtcnn_precision_in_one_line(tmp_path):
    from facepipe.cli import main

    image = shared_path("images", "group", "t1.jpg")
    runner = CliRunner()
    for extra, needle in ((["--precision", "int8"], "int8 is for embedders"),
                          (["--precision", "bf16", "--detector", "mtcnn"], "RetinaFace")):
        result = runner.invoke(main, ["align", str(image), "--out", str(tmp_path / "out"), *extra])
        assert result.exit_code == 2, result.output
        assert needle in result.output and "Traceback" not in result.output


@needs_bf16
def test_detect_runs_scrfd_in_bf16(home, tmp_path):
    from facepipe.cli import main

    image = shared_path("images", "group", "t1.jpg")
    weights = shared_path("weights", "scrfd", "scrfd_2.5g_bnkps.onnx")
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.jsonl"
        result = CliRunner().invoke(main, ["detect", str(image), "--out", str(out), "--detector", "scrfd",
                                           "--detector-weights", str(weights), "--precision", precision])
        assert result.exit_code == 0, result.output
        rows[precision] = [json.loads(line) for line in out.read_text().splitlines()]
    faces = {precision: [face for row in found for face in row["faces"]] for precision, found in rows.items()}
    assert len(faces["bf16"]) == len(faces["fp32"]) == 6
