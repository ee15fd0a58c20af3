"""Static int8 copies of ONNX embedders, calibrated on the user's own aligned face crops and cached.

``facepipe quantize --model NAME --calibrate DIR`` (or ``create_embedder(..., precision="int8",
calibrate=DIR)``) runs the network in float32 over up to ``MAX_CALIBRATION_CROPS`` crops of DIR, records the
range of every activation, and writes a QDQ model (int8 weights per output channel, uint8 activations: the
u8s8 form VNNI multiplies fastest) to ``<cache>/int8/<model digest>-<data digest>-v<QUANTIZER_VERSION>.onnx``. The same model and
the same crops give the same file, so it is made once; ``<cache>/int8/<model digest>.json`` names the latest
calibration of a model, which ``precision="int8"`` without ``calibrate`` uses. facepipe bundles no face data:
without a calibration, int8 is refused with the command to run (``auto`` skips it).

Calibration crops: every image under DIR (sorted, evenly subsampled to the cap), resized to the model's input
size if it is not already -- the crops ``facepipe align`` writes are. MinMax calibration: onnxruntime's
percentile calibrator failed on MobileFaceNet's graph (histograms of mismatched shapes), and keeping the first and
last convolutions in float raised the cosine to fp32 (0.990 -> 0.996 mean) but cost the speed that makes int8
worth having (README "Reduced precision").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

from facepipe.io.atomic import atomic_write_bytes, atomic_write_text
from facepipe.io.digest import digest_strings, file_fingerprint
from facepipe.io.images import list_images, read_image
from facepipe.runtime.cpu import PrecisionError

MAX_CALIBRATION_CROPS = 256
MIN_CALIBRATION_CROPS = 8
CALIBRATION_BATCH = 16
QUANTIZER_VERSION = 1  # part of every cache key: bump when the quantisation recipe changes
# Op types left in float32: their int8 forms are slow or absent in onnxruntime's CPU kernels and quantising
# them only adds Quantize/Dequantize pairs around float math.
FLOAT_OPS = ("PRelu", "BatchNormalization", "Sigmoid", "Softmax", "Flatten", "Reshape")


def int8_cache_dir() -> Path:
    from facepipe.models.checkpoint import cache_dir

    return cache_dir() / "int8"


def model_digest(model: bytes) -> str:
    return hashlib.sha256(model).hexdigest()[:20]


def calibration_files(directory: str | os.PathLike) -> list[Path]:
    """The images of ``directory`` used for calibration: sorted, evenly subsampled to the cap."""
    root = Path(directory)
    if not root.is_dir():
        raise PrecisionError(f"calibration folder {root} does not exist")
    files = list_images(root)
    if len(files) < MIN_CALIBRATION_CROPS:
        raise PrecisionError(
            f"calibration needs at least {MIN_CALIBRATION_CROPS} aligned face crops, found {len(files)} images in {root}"
        )
    if len(files) > MAX_CALIBRATION_CROPS:
        picks = np.linspace(0, len(files) - 1, MAX_CALIBRATION_CROPS).round().astype(int)
        files = [files[i] for i in picks]
    return files


def calibration_digest(files: Sequence[Path]) -> str:
    """Content digest of the calibration crops (bytes, not names: a replaced crop is a new calibration)."""
    return digest_strings(file_fingerprint(path) for path in files)[:20]


def read_crops(files: Sequence[Path], size: tuple[int, int]) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 BGR crops of ``size`` (H, W)."""
    height, width = size
    crops = []
    for path in files:
        image = read_image(path)
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        crops.append(image)
    return np.stack(crops)


class _BatchReader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed float32 batches."""

    def __init__(self, input_name: str, batches: Iterator[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_int8(model: bytes, input_name: str, calibration: np.ndarray, out_path: str | os.PathLike) -> Path:
    """Write a QDQ int8 copy of ``model`` calibrated on ``calibration`` ((N, 3, H, W) float32, preprocessed)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = iter([calibration[i : i + CALIBRATION_BATCH] for i in range(0, len(calibration), CALIBRATION_BATCH)])
    with tempfile.TemporaryDirectory(prefix="facepipe-int8-") as tmp:
        source, prepared, quantized = (Path(tmp) / name for name in ("model.onnx", "prepared.onnx", "int8.onnx"))
        source.write_bytes(_with_opset(model, 13))
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        import onnx

        graph = onnx.load(str(prepared)).graph
        keep_float = [node.name for node in graph.node if node.op_type in FLOAT_OPS]
        quantize_static(
            str(prepared),
            str(quantized),
            _BatchReader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_float,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
        return atomic_write_bytes(out_path, quantized.read_bytes())


def _with_opset(model: bytes, opset: int) -> bytes:
    """``model`` converted to at least ``opset``: per-channel DequantizeLinear needs 13 (old mxnet exports have 9)."""
    import onnx
    from onnx import version_converter

    proto = onnx.load_from_string(model)
    current = max((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), default=opset)
    if current >= opset:
        return model
    return version_converter.convert_version(proto, opset).SerializeToString()


def _pointer(digest: str) -> Path:
    return int8_cache_dir() / f"{digest}.json"


def int8_model(
    model: bytes,
    input_name: str,
    input_size: tuple[int, int],
    preprocess: Callable[[np.ndarray], np.ndarray],
    calibrate: str | os.PathLike | None = None,
    label: str = "model",
) -> Path:
    """The cached int8 copy of ``model``: calibrated on ``calibrate`` (made once per model and data digest),
    or the latest calibration recorded for this model when ``calibrate`` is None."""
    digest = model_digest(model)
    if calibrate is None:
        record = int8_model_record(model)
        if record is not None:
            return Path(record["path"])
        raise PrecisionError(
            f"precision int8 needs a calibration of {label} on your own aligned face crops: "
            f"run `facepipe quantize --model {label} --calibrate CROPS_DIR` once (or use bf16 / auto)"
        )
    files = calibration_files(calibrate)
    data = calibration_digest(files)
    path = int8_cache_dir() / f"{digest}-{data}-v{QUANTIZER_VERSION}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize_int8(model, input_name, preprocess(read_crops(files, input_size)), path)
    record = {"path": str(path), "model": label, "calibration": str(Path(calibrate).resolve()), "crops": len(files), "data_digest": data}
    atomic_write_text(_pointer(digest), json.dumps(record, indent=1))
    return path


def int8_model_record(model: bytes) -> dict | None:
    """What the latest calibration of ``model`` made: path, crops, calibration folder, data digest."""
    pointer = _pointer(model_digest(model))
    if not pointer.is_file():
        return None
    record = json.loads(pointer.read_text())
    return record if Path(record["path"]).is_file() else None


def has_calibration(model: bytes) -> bool:
    return int8_model_record(model) is not None
