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
    """Decode encoded image bytes to the facepipe image contract (see module docstring)."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    buffer = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
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


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read and decode one image file; raises ``ImageDecodeError`` with a human-readable reason."""
    return decode_image(read_image_bytes(path), max_pixels=max_pixels)


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
