import importlib.util
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from facepipe.io.images import read_image
from facepipe.io.verification_bin import (
    UnsafePickleError,
    VerificationBinError,
    decode_bin_images,
    load_bin,
    parse_bin,
    read_bin,
    safe_loads,
    write_bin,
)
from tests.conftest import REPO_ROOT, shared_path


def _load_make_cfp_bin():
    spec = importlib.util.spec_from_file_location("make_cfp_bin", REPO_ROOT / "eval" / "make_cfp_bin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _py2_style_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Protocol-2 pickle as Python 2 wrote insightface's files: images as SHORT_BINSTRING/BINSTRING."""
    out = io.BytesIO()
    out.write(b"\x80\x02")  # PROTO 2
    out.write(b"]")  # EMPTY_LIST (images)
    out.write(b"(")  # MARK
    for data in images:
        if len(data) < 256:
            out.write(b"U" + bytes([len(data)]) + data)
        else:
            out.write(b"T" + struct.pack("<i", len(data)) + data)
    out.write(b"e")  # APPENDS
    out.write(b"]")  # EMPTY_LIST (issame)
    out.write(b"(")
    for value in issame:
        out.write(b"\x88" if value else b"\x89")  # NEWTRUE / NEWFALSE
    out.write(b"e")
    out.write(b"\x86")  # TUPLE2
    out.write(b".")  # STOP
    return out.getvalue()


@pytest.fixture
def real_crops():
    """Four aligned 112x112 real faces: the shared aligned crop and the norm_crop golden crops."""
    crop = read_image(shared_path("images", "group", "Tom_Hanks_54745.png"))
    golden_dir = shared_path("golden", "norm_crop")
    others = [read_image(p) for p in sorted(golden_dir.glob("*.png"))[:3]]
    return [crop, *others]


def test_python2_insightface_layout_is_read_and_decoded_bgr(real_crops, tmp_path):
    encoded = [_png(c) for c in real_crops]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_style_pickle(encoded, [True, False]))
    content = read_bin(path)
    assert content.images == encoded
    assert content.issame.tolist() == [True, False]
    images, issame = load_bin(path)
    assert images.shape == (4, 112, 112, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, np.stack(real_crops))  # PNG: lossless, BGR in = BGR out
    assert issame.dtype == bool


def _png(image: np.ndarray) -> bytes:
    import cv2

    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def test_write_read_round_trip_jpeg_and_png(real_crops, tmp_path):
    path = write_bin(real_crops, [True, False], tmp_path / "x.bin", ext=".png")
    images, issame = load_bin(path)
    np.testing.assert_array_equal(images, np.stack(real_crops))
    assert issame.tolist() == [True, False]
    # JPEG q95: lossy but close; and the file is what insightface's reader expects.
    path = write_bin(real_crops, np.array([1, 0]), tmp_path / "y.bin")
    with open(path, "rb") as f:
        bins, labels = pickle.load(f, encoding="bytes")
    assert all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in bins)
    assert labels == [True, False] and all(type(v) is bool for v in labels)
    images, _ = load_bin(path)
    assert np.abs(images.astype(int) - np.stack(real_crops).astype(int)).mean() < 3.0
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_issame_as_numpy_array_or_numpy_bools_every_protocol(tmp_path):
    images = [b"a", b"b", b"c", b"d", b"e", b"f"]
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        for issame in (np.array([True, False, True]), [np.bool_(True), np.bool_(False), np.bool_(True)], [1, 0, 1]):
            content = parse_bin(pickle.dumps((images, issame), protocol=protocol))
            assert content.issame.tolist() == [True, False, True]
            assert content.images == images
    # Images stored as 1-D uint8 arrays (some converters) are accepted too.
    content = parse_bin(pickle.dumps(([np.frombuffer(b"xy", np.uint8)] * 2, [True]), protocol=2))
    assert content.images == [b"xy", b"xy"]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_malicious_pickles_are_refused_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    for payload in (_Exploit(marker), _EvalExploit()):
        data = pickle.dumps(([payload, b"x"], [True]), protocol=2)
        path = tmp_path / "evil.bin"
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError, match="refusing to load global"):
            read_bin(path)
    assert not marker.exists()
    # Plain pickle would have run it: proves the payload is live.
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()


def test_numpy_object_and_float_arrays_and_attribute_writes_are_refused():
    with pytest.raises(UnsafePickleError, match="not allowed"):
        safe_loads(pickle.dumps(np.array([None, 1], dtype=object)))
    with pytest.raises(UnsafePickleError, match="not allowed"):
        safe_loads(pickle.dumps(np.array([0.5])))
    # A BUILD aimed at an allowed global must not rewire the reader for later files.
    sneaky = b"\x80\x02cnumpy\ndtype\n}X\x08\x00\x00\x00__init__K\x01sb."
    with pytest.raises(VerificationBinError):
        safe_loads(sneaky)
    assert safe_loads(pickle.dumps(np.array([True]), protocol=2)).tolist() == [True]


def test_structure_errors_are_clear(tmp_path):
    with pytest.raises(VerificationBinError, match="3 images for 1 pairs"):
        parse_bin(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(VerificationBinError, match="expected a \\(images, issame\\) pair"):
        parse_bin(pickle.dumps({"a": 1}))
    with pytest.raises(VerificationBinError, match="only booleans"):
        parse_bin(pickle.dumps(([b"a", b"b"], [2])))
    with pytest.raises(VerificationBinError, match="not a readable pickle"):
        parse_bin(b"not a pickle at all")
    with pytest.raises(VerificationBinError, match="cannot read"):
        read_bin(tmp_path / "missing.bin")
    with pytest.raises(VerificationBinError, match="image 1: not a decodable image"):
        decode_bin_images([_png(np.zeros((112, 112, 3), np.uint8)), b"garbage"])


def test_non_112_images_are_resized():
    big = np.full((224, 224, 3), 200, np.uint8)
    images = decode_bin_images([_png(big)])
    assert images.shape == (1, 112, 112, 3) and int(images[0, 50, 50, 0]) == 200


def test_bin_built_from_real_cfp_images_by_make_cfp_bin(tmp_path):
    from facepipe.alignment import norm_crop
    from facepipe.detection.base import create_detector
    from facepipe.evaluation.protocols import read_cfp_pairs
    from facepipe.evaluation.raw_pipeline import choose_face

    root = shared_path("cfp", "cfp-dataset")
    make_cfp_bin = _load_make_cfp_bin()
    detector = create_detector("retinaface")
    out = tmp_path / "cfp_fp_small.bin"
    summary = make_cfp_bin.build_cfp_bin(root, "FP", out, detector, splits=[1], limit=6, ext=".png", pad=0.0)
    pairs = read_cfp_pairs(root, "FP").subset([1], 6)
    assert summary["pairs"] == 6 and summary["same"] == 3 and summary["images"] == len(pairs.unique_paths()) == 11
    assert summary["fallback"] == 0  # RetinaFace finds the face in every one of these images
    images, issame = load_bin(out)
    assert images.shape == (12, 112, 112, 3)
    assert issame.tolist() == [True, False] * 3
    assert all("frontal" in str(p) for p in pairs.left) and all("profile" in str(p) for p in pairs.right)
    # Each stored crop is the norm_crop of the main face of the real image, pair i = images 2i, 2i+1.
    for k, path in enumerate([pairs.left[2], pairs.right[2]]):
        image = read_image(path)
        face = choose_face(detector.detect([image])[0], image.shape)
        np.testing.assert_array_equal(images[4 + k], norm_crop(image, face.landmarks))
