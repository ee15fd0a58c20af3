"""Image decoding with clear errors: every image in facepipe enters through ``read_image``.

Output contract: ``(H, W, 3)`` uint8 BGR, EXIF orientation applied. Grayscale is expanded to three
channels, 16-bit is scaled to 8-bit, alpha is dropped, CMYK JPEGs are converted by the decoder.

Budgets, for every loader: files are read with ``read_file_bounded`` (regular files only, ``MAX_IMAGE_BYTES``),
and an image whose header declares more than ``max_pixels`` (``DEFAULT_MAX_PIXELS``) is refused before it is
decoded. The header is read by Pillow (no hand-written parser: what Pillow reports is what its decoders, and
libjpeg in OpenCV, will decode).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, JpegImagePlugin

from facepipe.io.files import MiB, FileReadError, read_file_bounded

# facepipe applies its own pixel budget (below), measured from the same header, before anything is decoded; Pillow
# only reads headers and EXIF here, and its decompression-bomb refusal would hide the real size of a large JPEG
# that ``decode_image_bounded`` can decode reduced.
Image.MAX_IMAGE_PIXELS = None

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


# One pixel budget for every image loader: 50 MP (e.g. 8660x5773) decodes to 150 MB of BGR; align's --max-pixels.
DEFAULT_MAX_PIXELS = 50_000_000
# Byte cap on an encoded image: far above any real photo (a 50 MP uncompressed TIFF is 150 MB).
MAX_IMAGE_BYTES = 512 * MiB


class ImageDecodeError(ValueError):
    """The file is not a decodable image; the message is the reason recorded in manifests."""


def is_image_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def read_image_bytes(path: str | os.PathLike, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of one image file, read with ``read_file_bounded`` (regular files only, at most ``max_bytes``)."""
    try:
        return read_file_bounded(path, max_bytes)
    except FileReadError as exc:
        raise ImageDecodeError(str(exc)) from None


@dataclass(frozen=True)
class ImageHeader:
    """What the decoder library tells from a file's header alone, before any pixel is decoded."""

    width: int
    height: int
    format: str  # Pillow's format name: "JPEG", "PNG", ...
    scan_offset: int | None = None  # JPEG: a byte offset inside the main image's first scan
    orientation: int = 1  # EXIF orientation 1..8 (1 when absent or invalid)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes | np.ndarray) -> ImageHeader:
    """Width, height, format and EXIF orientation from the header, through Pillow's lazy ``Image.open`` (it parses
    headers the way the decoders do, e.g. it skips junk bytes before a JPEG frame marker as libjpeg does); no
    pixel is decoded. The header is parsed once per image: decoding uses this record's orientation.

    Raises ``ImageDecodeError`` when no decoder recognizes the header.
    """
    buffer = _as_buffer(data)
    stream = io.BytesIO(memoryview(buffer))
    jpeg = _is_jpeg(buffer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # JPEGs through the JPEG plugin itself: Image.open would turn a JPEG carrying a multi-picture (MPF)
            # segment, as many phone photos do, into an MPO image and seek elsewhere in the file.
            with JpegImagePlugin.JpegImageFile(stream) if jpeg else Image.open(stream) as im:
                width, height = im.size
                fmt = "JPEG" if jpeg else (im.format or "?")
                # The JPEG plugin stops parsing at the first start-of-scan of the main image (after skipping APPn
                # segments such as an EXIF thumbnail by their length), so the stream position is in that scan.
                scan_offset = stream.tell() if jpeg else None
                orientation = _orientation(im) if b"Exif" in buffer[:65536].tobytes() else 1
    except Exception:  # Pillow raises UnidentifiedImageError, SyntaxError, struct.error... for bad headers
        raise ImageDecodeError("not a decodable image (corrupt, truncated or unsupported format)") from None
    if width < 1 or height < 1:
        raise ImageDecodeError(f"degenerate image size {width}x{height}")
    return ImageHeader(int(width), int(height), fmt, scan_offset, orientation)


def image_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """``(width, height)`` from the file header without decoding pixels; None when it cannot be told."""
    try:
        header = read_header(data)
    except ImageDecodeError:
        return None
    return header.width, header.height


def decode_image(data: bytes | np.ndarray, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes to the facepipe image contract (see module docstring).

    An image whose header declares more than ``max_pixels`` pixels is refused *before* it is decoded, so a
    20000x20000 file never allocates its 1.2 GB. ``decode_image_bounded`` decodes such JPEGs at reduced size instead.
    """
    buffer = _as_buffer(data)
    header = read_header(buffer)
    if header.pixels > max_pixels:
        raise ImageDecodeError(f"image too large: {header.width}x{header.height} > {max_pixels} pixels")
    _check_jpeg_complete(buffer, header)
    return _decode_full(buffer, header, max_pixels)


def decode_image_bounded(data: bytes | np.ndarray, max_pixels: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Decode within a pixel budget: a JPEG over it is decoded at 1/2, 1/4 or 1/8 size by libjpeg's scaled
    decoder (memory bounded by the reduced size); other formats over it are refused.

    Returns the image and ``(sx, sy)``, the factors that map its coordinates back to the full-size image.
    """
    buffer = _as_buffer(data)
    header = read_header(buffer)
    _check_jpeg_complete(buffer, header)
    if header.pixels <= max_pixels:
        return _decode_full(buffer, header, max_pixels), (1.0, 1.0)
    width, height = header.width, header.height
    if header.format != "JPEG":
        raise ImageDecodeError(f"image too large: {width}x{height} > {max_pixels} pixels (only JPEGs are decoded reduced)")
    for factor, flag in ((2, cv2.IMREAD_REDUCED_COLOR_2), (4, cv2.IMREAD_REDUCED_COLOR_4), (8, cv2.IMREAD_REDUCED_COLOR_8)):
        if -(-width // factor) * -(-height // factor) <= max_pixels:
            image = _imdecode(buffer, flag | cv2.IMREAD_IGNORE_ORIENTATION)
            scale = (width / image.shape[1], height / image.shape[0])
            if header.orientation >= 5:
                scale = (scale[1], scale[0])  # EXIF orientations 5-8 turn by 90 degrees: axes swap
            return np.ascontiguousarray(_orient(image, header.orientation)), scale
    raise ImageDecodeError(f"image too large: {width}x{height} is over {max_pixels} pixels even at 1/8 size")


def read_image(
    path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = MAX_IMAGE_BYTES
) -> np.ndarray:
    """Read and decode one image file within the byte and pixel budgets; raises ``ImageDecodeError`` with a
    human-readable reason."""
    return decode_image(read_image_bytes(path, max_bytes), max_pixels=max_pixels)


def _is_jpeg(buffer: np.ndarray) -> bool:
    return len(buffer) >= 3 and buffer[:3].tobytes() == b"\xff\xd8\xff"


def _as_buffer(data: bytes | np.ndarray) -> np.ndarray:
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    return data


def _check_jpeg_complete(buffer: np.ndarray, header: ImageHeader) -> None:
    # libjpeg decodes a truncated file "successfully", filling the missing rows with grey: refuse it instead.
    # Entropy-coded data never contains FF D9 (0xFF is stuffed), so the main image is complete iff an end-of-image
    # marker follows its first scan; bytes after that marker (camera trailers, appended data) do not matter.
    if header.format == "JPEG" and header.scan_offset is not None:
        if buffer[header.scan_offset :].tobytes().find(b"\xff\xd9") < 0:
            raise ImageDecodeError("truncated JPEG (no end-of-image marker)")


def _imdecode(buffer: np.ndarray, flags: int) -> np.ndarray:
    try:
        image = cv2.imdecode(buffer, flags)
    except cv2.error as exc:  # e.g. OpenCV's own pixel-count assertion on a header it reads differently
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "decoder error"
        raise ImageDecodeError(f"not a decodable image ({reason})") from None
    if image is None:
        raise ImageDecodeError("not a decodable image (corrupt, truncated or unsupported format)")
    return image


def _decode_full(buffer: np.ndarray, header: ImageHeader, max_pixels: int) -> np.ndarray:
    # IMREAD_UNCHANGED keeps 16-bit depth so it can be scaled rather than truncated, but it also skips EXIF
    # orientation: the orientation read with the header is applied here.
    image = _imdecode(buffer, cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
    image = _to_bgr_uint8(image)
    image = _orient(image, header.orientation)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageDecodeError(f"degenerate image size {image.shape[1]}x{image.shape[0]}")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise ImageDecodeError(f"image too large: {image.shape[1]}x{image.shape[0]} > {max_pixels} pixels")
    return np.ascontiguousarray(image)


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


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8) of an opened image, 1 when absent or invalid (a broken EXIF block is not fatal)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
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


@dataclass
class ImageScan:
    """What walking an input folder found: image files (sorted) and the folders that could not be listed, with
    the reason, so that their images are reported rather than silently missing."""

    images: list[Path]
    unlisted: dict[Path, str]


def scan_images(root: str | os.PathLike) -> ImageScan:
    """Walk ``root`` for image files.

    Symbolic links are followed, to folders (identity folders often are links into another tree) and to files
    (broken ones are listed so that reading them reports it); a link back to a folder being walked (a loop) is
    not entered again, since that folder's images are listed already. File names that are not UTF-8 are kept
    (see ``printable_path`` for naming them). Only names are listed here: nothing is opened, so FIFOs and
    devices with image suffixes are listed and refused when read.
    """
    root = Path(root)
    if not root.is_dir():
        return ImageScan([root] if os.path.lexists(root) else [], {})
    images: list[Path] = []
    unlisted: dict[Path, str] = {}
    top = os.stat(root)
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(root, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            unlisted[folder] = f"cannot list folder: {exc.strerror or exc}"
            continue
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks; False for broken links
                info = entry.stat() if is_dir else None
            except OSError as exc:
                unlisted[Path(entry.path)] = f"cannot open folder: {exc.strerror or exc}"
                continue
            if info is not None:
                identity = (info.st_dev, info.st_ino)
                if identity not in ancestors:
                    subfolders.append((Path(entry.path), ancestors | {identity}))
            elif is_image_path(entry.name):
                images.append(Path(entry.path))
        stack.extend(reversed(subfolders))
    return ImageScan(sorted(images), unlisted)


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files under ``root`` (see ``scan_images``), sorted, plus every folder that could not be listed:
    reading such an entry raises ``ImageDecodeError`` saying so, so callers record an error instead of losing
    the folder's images silently."""
    scan = scan_images(root)
    return sorted([*scan.images, *scan.unlisted])
