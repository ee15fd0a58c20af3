import struct
import zlib

import cv2
import numpy as np
import pytest

from facepipe.io.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    decode_image_bounded,
    image_size,
    read_image,
)


def _jpeg(height: int = 40, width: int = 60) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2] = 200
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _with_frame_size(jpeg: bytes, width: int, height: int) -> bytes:
    sof = jpeg.index(b"\xff\xc0")
    data = bytearray(jpeg)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _junk_before_frame(jpeg: bytes) -> bytes:
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[:sof] + b"\x00" + jpeg[sof:]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` (valid CRC) followed by a tiny, valid-looking stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_junk_byte_before_frame_marker_does_not_bypass_the_budget():
    junk = _junk_before_frame(_jpeg(400, 600))
    assert decode_image(junk).shape == (400, 600, 3)  # libjpeg decodes it, so its size must be known too
    assert image_size(junk) == (600, 400)
    with pytest.raises(ImageDecodeError, match="too large: 600x400"):
        decode_image(junk, max_pixels=100_000)
    reduced, scale = decode_image_bounded(junk, max_pixels=100_000)
    assert reduced.shape == (200, 300, 3) and scale == (2.0, 2.0)


def test_huge_declared_sizes_give_one_clear_error(tmp_path):
    huge_jpeg = _with_frame_size(_jpeg(), 60000, 60000)
    with pytest.raises(ImageDecodeError, match="too large: 60000x60000"):
        decode_image(huge_jpeg)
    with pytest.raises(ImageDecodeError, match="60000x60000 is over .* even at 1/8"):
        decode_image_bounded(huge_jpeg, DEFAULT_MAX_PIXELS)
    # Even with the budget lifted, OpenCV's own pixel-count assertion must come out as an ImageDecodeError.
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        decode_image(huge_jpeg, max_pixels=10**12)
    (tmp_path / "big.png").write_bytes(_png_header(12000, 12000))  # what detect decoded to a 9.4 GB peak
    with pytest.raises(ImageDecodeError, match="too large: 12000x12000"):
        read_image(tmp_path / "big.png")


def test_data_after_end_marker_is_accepted_truncation_is_not():
    jpeg = _jpeg(64, 64)
    expected = decode_image(jpeg)
    trailer = bytes(range(256)) * 64  # 16 KB of appended data, longer than any fixed tail window
    assert np.array_equal(decode_image(jpeg + trailer), expected)
    assert np.array_equal(decode_image_bounded(jpeg + trailer, 1024)[0].shape, (32, 32, 3))
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    cut = cv2.imencode(".jpg", noise)[1].tobytes()[:20000]
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(cut)
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image_bounded(cut, 1000)


def test_truncated_jpeg_with_exif_thumbnail_is_still_refused():
    from io import BytesIO

    from PIL import Image

    thumb = BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(thumb, "JPEG")  # an embedded JPEG with its own end marker
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)  # a long scan to cut
    image = Image.fromarray(noise)
    exif = image.getexif()
    exif[0x0112] = 1
    out = BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes() + thumb.getvalue())
    data = out.getvalue()
    assert decode_image(data).shape == (256, 256, 3)
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(data[: len(data) // 2])


def test_fifo_named_like_an_image_is_an_error_not_a_hang(tmp_path):
    import os

    os.mkfifo(tmp_path / "y.jpg")
    with pytest.raises(ImageDecodeError, match="FIFO"):
        read_image(tmp_path / "y.jpg")
    (tmp_path / "z.jpg").symlink_to("/dev/zero")
    with pytest.raises(ImageDecodeError, match="character device"):
        read_image(tmp_path / "z.jpg")
    (tmp_path / "big.jpg").write_bytes(_jpeg())
    with pytest.raises(ImageDecodeError, match="file too large"):
        read_image(tmp_path / "big.jpg", max_bytes=100)


def test_jpeg_with_multi_picture_segment_is_a_jpeg():
    """Phone photos often carry an MPF segment (Pillow calls them MPO): they must be checked and decoded
    reduced like any JPEG."""
    from io import BytesIO

    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    out = BytesIO()
    Image.fromarray(noise).save(out, "MPO", save_all=True, append_images=[Image.new("RGB", (300, 200))])
    data = out.getvalue()
    assert decode_image(data).shape == (200, 300, 3)
    reduced, scale = decode_image_bounded(data, 20_000)
    assert reduced.shape == (100, 150, 3) and scale == (2.0, 2.0)
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        decode_image(data[: len(data) // 3])
