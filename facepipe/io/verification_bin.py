"""insightface verification ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...): safe reader and writer.

Format: a pickle of ``(bins, issame)``; ``bins`` holds ``2 * n_pairs`` encoded images (JPEG/PNG bytes, 112x112
in the released files), pair ``i`` is ``(bins[2i], bins[2i+1])`` and ``issame[i]`` says whether both show the
same person. The released files were written by Python 2, so they are read with ``encoding="bytes"``.

Pickle can run arbitrary code, so files are read with ``RestrictedUnpickler``. It resolves **no real global**.
A handful of names that honest writers emit are mapped to small validating stand-ins instead:

* ``_codecs.encode(text, "latin1")``: how Python 3 pickles ``bytes`` under protocol 2;
* numpy arrays and scalars (some tools store ``issame`` as a numpy bool array or a list of ``numpy.bool_``):
  ``numpy[._]core.multiarray._reconstruct``, ``numpy[._]core.numeric._frombuffer``,
  ``numpy[._]core.multiarray.scalar``, ``numpy.ndarray`` and ``numpy.dtype``. The stand-ins accept only
  boolean and integer dtypes with plain byte orders, rebuild arrays with ``np.frombuffer`` from raw bytes and
  check the shape against the byte count. numpy's own ``__setstate__`` never sees data from the file (its dtype
  state carries flags that could make numpy read raw bytes as object pointers).

Everything else (``os.system``, ``builtins.eval``, any class) is refused before anything is called.

Images are decoded to BGR like every image in facepipe; insightface decodes to RGB because its models take RGB,
facepipe's embedders do that conversion themselves.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from facepipe.io.files import GiB, FileReadError, read_file_bounded
from facepipe.io.images import ImageDecodeError, decode_image

MAX_BIN_BYTES = 8 * GiB  # the released files are 50-450 MB


class VerificationBinError(ValueError):
    """The file is not a usable verification .bin (unsafe pickle, wrong structure, undecodable image)."""


class UnsafePickleError(VerificationBinError, pickle.UnpicklingError):
    """The pickle asked for a global that the restricted unpickler does not allow."""


_SAFE_DTYPE_KINDS = frozenset("biu")  # bool, signed and unsigned integers: raw bytes, no pointers


class _DTypeStandIn:
    """Stand-in for ``numpy.dtype(spec, align, copy)`` followed by ``BUILD`` with the dtype state."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(spec, (str, bytes)):
            raise UnsafePickleError(f"numpy dtype spec must be a string, got {type(spec).__name__}")
        spec = spec.decode("ascii") if isinstance(spec, bytes) else spec
        try:
            dtype = np.dtype(spec)
        except TypeError as exc:
            raise UnsafePickleError(f"invalid numpy dtype {spec!r}: {exc}") from None
        if dtype.kind not in _SAFE_DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise UnsafePickleError(f"numpy dtype {spec!r} is not allowed (only bool and integer arrays)")
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byteorder, subarray, names, fields, elsize, alignment, flags).
        if not isinstance(state, tuple) or len(state) < 2:
            raise UnsafePickleError("malformed numpy dtype state")
        byteorder = state[1].decode("ascii") if isinstance(state[1], bytes) else state[1]
        if byteorder not in ("<", ">", "|", "=") or any(s is not None for s in state[2:5]):
            raise UnsafePickleError("numpy dtype state with fields or sub-arrays is not allowed")
        if byteorder in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(byteorder)


def _safe_dtype(value: Any) -> np.dtype:
    if not isinstance(value, _DTypeStandIn):
        raise UnsafePickleError(f"expected a numpy dtype, got {type(value).__name__}")
    return value.dtype


def _array_from_bytes(data: Any, dtype: np.dtype, shape: Any, fortran: bool = False) -> np.ndarray:
    if isinstance(data, str):  # numpy pickles raw data as latin-1 text under Python 2
        data = data.encode("latin1")
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"numpy array data must be bytes, got {type(data).__name__}")
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    count = 1
    for s in shape:  # Python integers: a product of huge dimensions cannot wrap around to match the byte count
        count *= s
    if any(s < 0 for s in shape) or count * dtype.itemsize != len(data):
        raise UnsafePickleError(f"numpy array shape {shape} does not match {len(data)} bytes of {dtype}")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


class _ArrayStandIn:
    """Stand-in for ``_reconstruct(ndarray, shape, typecode)`` + ``BUILD`` with the array state."""

    def __init__(self, subtype: Any, shape: Any = (0,), typecode: Any = b"b") -> None:
        if subtype is not _NDARRAY_TOKEN:
            raise UnsafePickleError("only plain numpy.ndarray may be reconstructed")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy's array state: (version, shape, dtype, is_fortran, raw data).
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("malformed numpy array state")
        _, shape, dtype, fortran, data = state
        self.array = _array_from_bytes(data, _safe_dtype(dtype), shape, bool(fortran))


class _Sealed:
    """Base of what ``find_class`` hands out: no ``__dict__``, no attribute writes, so a ``BUILD`` opcode
    aimed at it fails instead of rewiring the reader for later files."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError("a verification .bin may not set attributes")


class _NdarrayToken(_Sealed):
    """What ``numpy.ndarray`` resolves to: a token, never the real class."""


class _AllowedCallable(_Sealed):
    __slots__ = ("_function",)

    def __init__(self, function: Any) -> None:
        object.__setattr__(self, "_function", function)

    def __call__(self, *args: Any) -> Any:
        return self._function(*args)


_NDARRAY_TOKEN = _NdarrayToken()


def _frombuffer(data: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    return _array_from_bytes(data, _safe_dtype(dtype), shape, order in ("F", b"F"))


def _scalar(dtype: Any, data: Any = b"") -> Any:
    return _array_from_bytes(data, _safe_dtype(dtype), ()).item()


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("only _codecs.encode(str, 'latin1') is allowed (protocol-2 bytes)")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _AllowedCallable(_codecs_encode),
    ("numpy", "ndarray"): _NDARRAY_TOKEN,
    ("numpy", "dtype"): _AllowedCallable(_DTypeStandIn),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _AllowedCallable(_ArrayStandIn)
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _AllowedCallable(_scalar)
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _AllowedCallable(_frombuffer)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves no real global; see the module docstring for the stand-ins it offers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global '{module}.{name}': a verification .bin holds only image bytes and "
                "booleans, so this file is corrupt or malicious"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent ids are not allowed in a verification .bin")


# Limits on what a .bin may expand to, so a hostile pickle is refused at once instead of exhausting time or
# memory. An honest file is (list of bytes, list of bools): depth 3 (numpy arrays add none: they are leaves), and
# every element and every byte of it is written out in the file, so its expansion is bounded by the file size;
# shared references (the pickle memo) are what lets a small file describe an exponentially large tree.
MAX_DEPTH = 16
EXPANSION_FACTOR = 4  # elements and bytes may reach this multiple of the file size (an image repeated by reference)


def _check_opcodes(data: bytes) -> None:
    """Walk the opcodes without executing them: a declared length beyond the end of the file (a 70 GiB
    ``BINBYTES8`` in an 8 MB file, which the C unpickler would allocate before reading) fails here."""
    try:
        for _ in pickletools.genops(data):
            pass
    except (ValueError, EOFError) as exc:
        raise VerificationBinError(f"not a readable pickle: {exc}") from None


def _materialize(value: Any, size: int) -> Any:
    """Replace array stand-ins by their arrays (lists and tuples only: nothing else can come out), walking the
    tree with limits on depth, element count and total bytes (``EXPANSION_FACTOR`` times the file ``size``)."""
    budget = EXPANSION_FACTOR * size + 1024
    elements = 0
    total_bytes = 0

    def walk(node: Any, depth: int) -> Any:
        nonlocal elements, total_bytes
        if depth > MAX_DEPTH:
            raise UnsafePickleError(f"nesting deeper than {MAX_DEPTH} levels (a verification .bin has 3)")
        elements += 1
        if elements > budget:
            raise UnsafePickleError(f"expands to more than {budget} elements for a {size}-byte file (shared-reference bomb)")
        if isinstance(node, (bytes, bytearray, str)):
            total_bytes += len(node)
            if total_bytes > budget:
                raise UnsafePickleError(f"expands to more than {budget} bytes for a {size}-byte file")
            return node
        if isinstance(node, _ArrayStandIn):
            if node.array is None:
                raise UnsafePickleError("numpy array without state")
            total_bytes += node.array.nbytes
            return node.array
        if isinstance(node, _DTypeStandIn):
            raise UnsafePickleError("unexpected bare numpy dtype")
        if isinstance(node, list):
            return [walk(v, depth + 1) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v, depth + 1) for v in node)
        return node

    return walk(value, 1)


def safe_loads(data: bytes) -> Any:
    """Unpickle ``data`` with ``RestrictedUnpickler`` (``encoding='bytes'`` for Python 2 files), refusing
    declared lengths past the end of the data and expansions past the limits above."""
    _check_opcodes(data)
    try:
        return _materialize(RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load(), len(data))
    except VerificationBinError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise VerificationBinError(f"not a readable pickle: {type(exc).__name__}: {exc}") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise VerificationBinError(f"refused: the pickle is too deep or too large ({type(exc).__name__})") from None


@dataclass(frozen=True)
class VerificationBin:
    """The undecoded content of a .bin: ``2 * n_pairs`` encoded images and ``n_pairs`` labels."""

    images: list[bytes]
    issame: np.ndarray  # (n_pairs,) bool

    @property
    def n_pairs(self) -> int:
        return len(self.issame)


def _as_issame(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        labels = value.reshape(-1)
    elif isinstance(value, (list, tuple)):
        if not all(isinstance(v, (bool, int, np.bool_, np.integer)) for v in value):
            raise VerificationBinError("issame must contain only booleans")
        labels = np.asarray(value)
    else:
        raise VerificationBinError(f"issame must be a list of booleans, got {type(value).__name__}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise VerificationBinError("issame must contain only booleans (0/1)")
    return labels.astype(bool)


def _as_image_bytes(value: Any, index: int) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    raise VerificationBinError(f"image {index} is a {type(value).__name__}, expected encoded image bytes")


def parse_bin(data: bytes, source: str = "<bytes>") -> VerificationBin:
    """Parse the bytes of a .bin file safely and check its structure."""
    try:
        content = safe_loads(data)
    except VerificationBinError as exc:
        raise type(exc)(f"{source}: {exc}") from None
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise VerificationBinError(f"{source}: expected a (images, issame) pair, got {type(content).__name__}")
    raw_images, raw_issame = content
    if not isinstance(raw_images, (list, tuple)):
        raise VerificationBinError(f"{source}: images must be a list, got {type(raw_images).__name__}")
    images = [_as_image_bytes(v, i) for i, v in enumerate(raw_images)]
    issame = _as_issame(raw_issame)
    if len(images) != 2 * len(issame):
        raise VerificationBinError(f"{source}: {len(images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return VerificationBin(images=images, issame=issame)


def read_bin(path: str | os.PathLike) -> VerificationBin:
    """Read a verification .bin without decoding its images."""
    path = Path(path)
    try:
        data = read_file_bounded(path, MAX_BIN_BYTES)
    except FileReadError as exc:
        raise VerificationBinError(f"{path}: cannot read: {exc}") from None
    return parse_bin(data, source=str(path))


def decode_bin_images(
    images: Sequence[bytes], image_size: int = 112, source: str = "<bin>", progress: bool = False
) -> np.ndarray:
    """Decode encoded images to ``(N, S, S, 3)`` uint8 BGR, resizing any that are not ``S x S``."""
    out = np.empty((len(images), image_size, image_size, 3), dtype=np.uint8)
    iterator: Any = enumerate(images)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(images), desc=f"decode {Path(source).name}", unit="img")
    for i, data in iterator:
        try:
            image = decode_image(data)
        except ImageDecodeError as exc:
            raise VerificationBinError(f"{source}: image {i}: {exc}") from None
        if image.shape[:2] != (image_size, image_size):
            image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
        out[i] = image
    return out


def load_bin(
    path: str | os.PathLike, image_size: int = 112, limit_pairs: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode a .bin: ``(images (2P, S, S, 3) BGR uint8, issame (P,) bool)``; pairs are rows 2i, 2i+1."""
    content = read_bin(path)
    n_pairs = content.n_pairs if limit_pairs is None else min(limit_pairs, content.n_pairs)
    images = decode_bin_images(content.images[: 2 * n_pairs], image_size, source=str(path), progress=progress)
    return images, content.issame[:n_pairs].copy()


def encode_image(image: np.ndarray, ext: str = ".jpg", jpeg_quality: int = 95) -> bytes:
    """Encode a BGR uint8 image (``.jpg`` as the released files, or lossless ``.png``)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext.lower() in (".jpg", ".jpeg") else []
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(image), params)
    if not ok:
        raise ValueError(f"cannot encode image of shape {image.shape} as {ext}")
    return buffer.tobytes()


def write_bin(
    images: Sequence[bytes | np.ndarray],
    issame: Sequence[bool] | np.ndarray,
    path: str | os.PathLike,
    ext: str = ".jpg",
    jpeg_quality: int = 95,
) -> Path:
    """Write a .bin readable by insightface and by ``read_bin``.

    ``images`` are encoded bytes (stored as given) or BGR uint8 arrays (encoded with ``ext``); pair ``i`` is
    ``(images[2i], images[2i+1])``. ``issame`` is stored as a list of Python bools, like insightface's files.
    The file is written to a temporary name and renamed, so a crash never leaves a truncated .bin.
    """
    labels = [bool(v) for v in np.asarray(issame).reshape(-1)]
    if len(images) != 2 * len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} pairs (expected {2 * len(labels)})")
    encoded = [bytes(im) if isinstance(im, (bytes, bytearray)) else encode_image(im, ext, jpeg_quality) for im in images]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump((encoded, labels), f, protocol=4)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path
