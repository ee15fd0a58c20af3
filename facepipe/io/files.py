"""Bounded reading of input files: the one way facepipe reads a file it did not write itself.

An input folder may hold anything: a FIFO named ``y.jpg`` (a plain ``open().read()`` blocks forever), a
symlink to ``/dev/zero`` (reads until memory runs out), a 40 GB file named ``.bin``. ``read_file_bounded``
reads only regular files, never blocks on open, and reads at most ``max_bytes``; everything else raises
``FileReadError`` whose message is one short reason fit for a manifest ``error`` row or a command-line error.
"""

from __future__ import annotations

import errno
import re
import os
import stat

MiB = 1 << 20
GiB = 1 << 30


class FileReadError(ValueError):
    """The path cannot be read as a regular file within the size cap; the message says why in a few words."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: str | os.PathLike) -> os.stat_result:
    """``stat`` of ``path`` (following symlinks) when it is a regular file; else ``FileReadError``."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileReadError("broken symbolic link" if os.path.islink(path) else "file not found") from None
    except PermissionError:
        raise FileReadError("permission denied") from None
    except OSError as exc:
        raise FileReadError(_os_reason(exc)) from None
    if stat.S_ISDIR(info.st_mode):
        unlistable = not os.access(path, os.R_OK | os.X_OK)
        raise FileReadError("is a directory" + (" that cannot be listed (permission denied)" if unlistable else ""))
    if not stat.S_ISREG(info.st_mode):
        raise FileReadError(f"not a regular file: {_kind(info.st_mode)}")
    return info


def read_file_bounded(path: str | os.PathLike, max_bytes: int) -> bytes:
    """All bytes of the regular file ``path``, refusing files over ``max_bytes``.

    The type is checked before opening and again on the open descriptor (the path may be swapped in between);
    ``O_NONBLOCK`` makes even a FIFO that slips through open at once, and at most ``max_bytes + 1`` bytes are
    ever read, so a file that grows while being read cannot exhaust memory either.
    """
    check_regular_file(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileReadError(_os_reason(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileReadError(f"not a regular file: {_kind(info.st_mode)}")
        if info.st_size > max_bytes:
            raise FileReadError(f"file too large: {info.st_size} bytes > {max_bytes} allowed")
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            block = os.read(fd, min(remaining, 16 * MiB))
            if not block:
                break
            chunks.append(block)
            remaining -= len(block)
    except OSError as exc:
        raise FileReadError(_os_reason(exc)) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise FileReadError(f"file too large: over {max_bytes} bytes")
    return data


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES or exc.errno == errno.EPERM:
        return "permission denied"
    if exc.errno == errno.ENOENT:
        return "file not found"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot read file: {exc.strerror or exc}"


def printable_path(path: str | os.PathLike) -> str:
    """``path`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (which Python carries as surrogate
    escapes, and which Parquet, Arrow and JSON writers refuse) are written ``\\xNN``. Names that are UTF-8 are
    returned unchanged; ``os_path_of`` turns the text back into the path."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def os_path_of(printable: str) -> str:
    """The file-system path that ``printable_path`` printed as ``printable``.

    A name that exists as written is taken literally (a real backslash in a UTF-8 name); otherwise ``\\xNN``
    escapes are turned back into the raw bytes.
    """
    if "\\x" not in printable or os.path.lexists(printable):
        return printable
    return os.fsdecode(_ESCAPED_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), printable.encode("utf-8")))


def read_text_bounded(path: str | os.PathLike, max_bytes: int) -> str:
    """A UTF-8 text file read with ``read_file_bounded``; bytes that are not UTF-8 raise ``FileReadError``
    naming the line (a byte-order mark is dropped)."""
    data = read_file_bounded(path, max_bytes)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FileReadError(f"line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: an exception as the one line a command prints."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
