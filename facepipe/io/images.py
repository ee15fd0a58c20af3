"""Image decoding with clear errors: every image in facepipe enters through ``read_image``.

Output contract: ``(H, W, 3)`` uint8 BGR, EXIF orientation applied. Grayscale is expanded to three
channels, 16-bit is scaled to 8-bit, alpha is dropped, CMYK JPEGs are converted by the decoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


class ImageDecodeError(ValueError):
    """The file is not a decodable image; the message is the reason recorded in manifests."""


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image_bytes(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageDecodeError("broken symbolic link")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from None
    return data


def decode_image(data: bytes | np.ndarray, max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to the facepipe image contract (see module docstring).

    With ``max_pixels``, an image whose header declares more pixels is refused *before* it is decoded, so a
    20000x20000 file never allocates its 1.2 GB. ``decode_image_bounded`` decodes such JPEGs at reduced size instead.
    """
    buffer = _as_buffer(data)
    if max_pixels is not None:
        size = image_size(buffer)
        if size is not None and size[0] * size[1] > max_pixels:
            raise ImageDecodeError(f"image too large: {size[0]}x{size[1]} > {max_pixels} pixels")
    return _decode_full(buffer, max_pixels)


def decode_image_bounded(data: bytes | np.ndarray, max_pixels: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Decode within a pixel budget: a JPEG over it is decoded at 1/2, 1/4 or 1/8 size by libjpeg's scaled
    decoder (memory bounded by the reduced size); other formats over it are refused.

    Returns the image and ``(sx, sy)``, the factors that map its coordinates back to the full-size image.
    """
    buffer = _as_buffer(data)
    size = image_size(buffer)
    if size is None or size[0] * size[1] <= max_pixels:
        return _decode_full(buffer, max_pixels), (1.0, 1.0)
    width, height = size
    if not _is_jpeg(buffer):
        raise ImageDecodeError(f"image too large: {width}x{height} > {max_pixels} pixels (only JPEGs are decoded reduced)")
    _check_jpeg_complete(buffer)
    for factor, flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8)):
        if -(-width // factor) * -(-height // factor) <= max_pixels:
            image = cv2.imdecode(buffer, flag | cv2.IMREAD_IGNORE_ORIENTATION)
            if image is None:
                raise ImageDecodeError("not a decodable image (corrupt, truncated or unsupported format)")
            scale = (width / image.shape[1], height / image.shape[0])
            rotated = _apply_exif_orientation(buffer, image)
            if rotated.shape[:2] != image.shape[:2] or (rotated is not image and exif_orientation(buffer) >= 5):
                scale = (scale[1], scale[0])  # EXIF orientations 5-8 turn by 90 degrees: axes swap
            return np.ascontiguousarray(rotated), scale
    raise ImageDecodeError(f"image too large: {width}x{height} is over {max_pixels} pixels even at 1/8 size")


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read and decode one image file; raises ``ImageDecodeError`` with a human-readable reason."""
    return decode_image(read_image_bytes(path), max_pixels=max_pixels)


def _as_buffer(data: bytes | np.ndarray) -> np.ndarray:
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return data


def _check_jpeg_complete(buffer: np.ndarray) -> None:
    # libjpeg decodes a truncated file "successfully", filling the missing rows with grey: refuse it instead.
    if _is_jpeg(buffer):
        tail = buffer[-4096:].tobytes().rstrip(b"\x00")
        if b"\xff\xd9" not in tail:
            raise ImageDecodeError("truncated JPEG (no end-of-image marker)")


def _decode_full(buffer: np.ndarray, max_pixels: int | None) -> np.ndarray:
    _check_jpeg_complete(buffer)
    # IMREAD_UNCHANGED keeps 16-bit depth so it can be scaled rather than truncated; IMREAD_ANYCOLOR alone
    # would skip EXIF orientation, so orientation is applied by a second decode of the header only when present.
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise ImageDecodeError("not a decodable image (corrupt, truncated or unsupported format)")
    image = _to_bgr_uint8(image)
    image = _apply_exif_orientation(buffer, image)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageDecodeError(f"degenerate image size {image.shape[1]}x{image.shape[0]}")
    if max_pixels is not None and image.shape[0] * image.shape[1] > max_pixels:
        raise ImageDecodeError(f"image too large: {image.shape[1]}x{image.shape[0]} > {max_pixels} pixels")
    return np.ascontiguousarray(image)


def _is_jpeg(buffer: np.ndarray) -> bool:
    return len(buffer) >= 3 and buffer[:3].tobytes() == b"\xff\xd8\xff"


# JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT 0xC4, JPG 0xC8, DAC 0xCC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def image_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` from the file header without decoding pixels; None when it cannot be told.

    JPEG and PNG headers are parsed directly; other formats through Pillow's lazy open.
    """
    head = bytes(data[:32]) if isinstance(data, (bytes, bytearray, memoryview)) else data[:32].tobytes()
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    raw = data if isinstance(data, (bytes, bytearray, memoryview)) else data.tobytes()
    if raw[:2] == b"\xff\xd8":
        return _jpeg_size(bytes(raw))
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(bytes(raw))) as im:
                return im.size
    except Image.DecompressionBombError as exc:  # Pillow refuses very large images at open time
        import re

        found = re.search(r"\((\d+) pixels", str(exc))
        return (int(found.group(1)), 1) if found else None
    except Exception:
        return None


def _jpeg_size(raw: bytes) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return None
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(raw[pos + 2 : pos + 4], "big")
        if marker in _SOF_MARKERS and pos + 9 <= len(raw):
            height = int.from_bytes(raw[pos + 5 : pos + 7], "big")
            width = int.from_bytes(raw[pos + 7 : pos + 9], "big")
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageDecodeError(f"unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ImageDecodeError(f"unsupported channel count {channels}")


_EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(buffer: np.ndarray) -> int:
    """EXIF orientation (1..8) of an encoded image, 1 when absent or invalid."""
    from PIL import Image  # local import: only needed for files that carry EXIF

    import io

    try:
        with Image.open(io.BytesIO(buffer.tobytes())) as im:
            value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _apply_exif_orientation(buffer: np.ndarray, image: np.ndarray) -> np.ndarray:
    # Only JPEG/TIFF/WebP/PNG can carry EXIF; cheap check for the APP1 "Exif" marker before parsing.
    head = buffer[:65536].tobytes()
    if b"Exif" not in head:
        return image
    orientation = exif_orientation(buffer)
    if orientation == 1:
        return image
    transforms = {
        2: lambda im: cv2.flip(im, 1),
        3: lambda im: cv2.rotate(im, cv2.ROTATE_180),
        4: lambda im: cv2.flip(im, 0),
        5: lambda im: cv2.flip(cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE), 1),
        6: lambda im: cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE),
        7: lambda im: cv2.flip(cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE), 1),
        8: lambda im: cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE),
    }
    return transforms[orientation](image)


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (recursively), sorted, symlinks included (broken ones too)."""
    root = Path(root)
    if root.is_file() or (root.is_symlink() and not root.exists()):
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames:
            if is_image_path(name):
                found.append(Path(dirpath) / name)
    return sorted(found)
