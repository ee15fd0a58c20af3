import io
import subprocess
import sys

import cv2
import numpy as np
import pytest

from facepipe.io.images import ImageDecodeError, decode_image, decode_image_bounded, image_size, read_image
from tests.conftest import shared_path


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


@pytest.mark.parametrize("ext", [".jpg", ".png", ".bmp", ".webp"])
def test_header_size_without_decoding(ext):
    image = np.full((37, 91, 3), 128, np.uint8)
    assert image_size(cv2.imencode(ext, image)[1].tobytes()) == (91, 37)


def test_bad_files_give_reasons(tmp_path):
    real = shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", "01.jpg").read_bytes()
    cases = {
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "truncated.jpg": real[: len(real) // 3],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ImageDecodeError, match="empty"):
        read_image(tmp_path / "zero.jpg")
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        read_image(tmp_path / "text.jpg")
    with pytest.raises(ImageDecodeError, match="truncated"):
        read_image(tmp_path / "truncated.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="broken symbolic link"):
        read_image(tmp_path / "broken.jpg")


def test_color_variants_decode_to_bgr_uint8(tmp_path):
    from PIL import Image

    bgr = read_image(shared_path("cfp", "cfp-dataset", "Data", "Images", "001", "frontal", "01.jpg"))
    rgb = Image.fromarray(bgr[:, :, ::-1].copy())
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cmyk = read_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == bgr.shape and cmyk.dtype == np.uint8
    assert np.abs(cmyk.astype(int) - bgr).mean() < 6  # lossy round trip through CMYK JPEG
    cv2.imwrite(str(tmp_path / "deep.png"), bgr.astype(np.uint16) * 257)
    assert np.array_equal(read_image(tmp_path / "deep.png"), bgr)  # 16-bit scaled, not truncated
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    decoded = read_image(tmp_path / "gray.png")
    assert decoded.shape == bgr.shape and np.array_equal(decoded[:, :, 0], gray) and np.array_equal(decoded[:, :, 2], gray)
    cv2.imwrite(str(tmp_path / "one.png"), np.array([[[1, 2, 3]]], np.uint8))
    assert read_image(tmp_path / "one.png").shape == (1, 1, 3)


def test_exif_orientation_is_honoured(tmp_path):
    from PIL import Image

    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :10] = 255  # white band on the left
    pil = Image.fromarray(image[:, :, ::-1].copy())
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    pil.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    decoded = read_image(tmp_path / "rotated.jpg")
    assert decoded.shape == (40, 20, 3)
    assert decoded[:10].mean() > 200 and decoded[-10:].mean() < 50  # the band is now on top


def test_large_jpeg_is_decoded_reduced_and_other_formats_refused():
    image = np.full((3000, 4000, 3), 90, np.uint8)
    data = _jpeg(image)
    with pytest.raises(ImageDecodeError, match="too large: 4000x3000"):
        decode_image(data, max_pixels=2_000_000)
    reduced, scale = decode_image_bounded(data, max_pixels=2_000_000)
    assert reduced.shape == (750, 1000, 3) and scale == (4.0, 4.0)
    assert abs(int(reduced[100, 100, 0]) - 90) <= 2
    with pytest.raises(ImageDecodeError, match="only JPEGs"):
        decode_image_bounded(cv2.imencode(".png", image)[1].tobytes(), max_pixels=2_000_000)
    with pytest.raises(ImageDecodeError, match="even at 1/8"):
        decode_image_bounded(data, max_pixels=1000)
    full, scale = decode_image_bounded(data, max_pixels=20_000_000)
    assert full.shape == (3000, 4000, 3) and scale == (1.0, 1.0)


_HUGE_CHILD = """
import resource, sys
import cv2, numpy as np
from facepipe.io.images import decode_image_bounded, image_size
data = open(sys.argv[1], 'rb').read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image, scale = decode_image_bounded(data, 50_000_000)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(image.shape[0], image.shape[1], scale[0], (after - before) // 1024, image_size(data)[0])
"""


def test_20000x20000_jpeg_decodes_in_bounded_memory(tmp_path):
    huge = np.full((20000, 20000), 77, np.uint8)  # one channel: 400 MB here, a 1.2 GB BGR image if fully decoded
    path = tmp_path / "huge.jpg"
    cv2.imwrite(str(path), huge, [cv2.IMWRITE_JPEG_QUALITY, 50])
    del huge
    out = subprocess.run([sys.executable, "-c", _HUGE_CHILD, str(path)], capture_output=True, text=True, check=True)
    height, width, scale, grown_mb, header_width = out.stdout.split()
    assert (int(height), int(width), float(scale), int(header_width)) == (5000, 5000, 4.0, 20000)
    assert int(grown_mb) < 300, f"decoding grew the process by {grown_mb} MB"


def test_exif_orientation_of_a_reduced_decode_swaps_the_scale_with_the_axes(tmp_path):
    from PIL import Image

    image = np.zeros((40, 81, 3), np.uint8)
    image[:, :10] = 255  # white band on the left of the stored pixels: on top once turned clockwise
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", exif=exif, quality=100)
    reduced, scale = decode_image_bounded(buffer.getvalue(), max_pixels=1000)  # 81x40 > 1000: decoded at 1/2
    assert reduced.shape == (41, 20, 3)  # stored 41x20 (ceil), turned: 20 wide, 41 high
    assert scale == (40 / 20, 81 / 41)  # (x, y) of the turned image: x comes from the stored rows
    assert reduced[:4].mean() > 200 and reduced[-10:].mean() < 50
