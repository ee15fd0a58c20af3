"""Atomic file writes: a file appears under its name complete, or not at all.

Every writer in facepipe that produces a result file (reports, shards, checkpoints, plots, crops, caches) goes
through here, so an interrupted run never leaves a file that looks finished. Files get the permissions a plain
``open(path, "w")`` would give (``0o666`` less the umask): ``tempfile.mkstemp`` creates them ``0o600``, which
would make outputs unreadable to the rest of a team.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp"  # every temporary name contains it: ``cleanup_temporaries`` finds a killed run's leftovers
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it, so briefly and under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def temporary_path(path: str | os.PathLike) -> Path:
    """A new, empty temporary file beside ``path`` (same folder, so the rename is atomic), with the umask's
    permissions and ``path``'s extension (for writers that choose the format by extension: cv2, numpy)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=f"{TEMP_MARK}{path.suffix}")
    os.close(handle)
    os.chmod(tmp_name, 0o666 & ~current_umask())
    return Path(tmp_name)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, fsync: bool = False) -> Path:
    """Move a finished temporary file onto ``path`` (atomic on POSIX); ``fsync`` first for files a resume
    relies on."""
    if fsync:
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
    os.replace(tmp, path)
    return Path(path)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only when the block finishes without error."""
    tmp = temporary_path(path)
    try:
        yield tmp
        publish(tmp, path, fsync)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def cleanup_temporaries(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Remove the temporary files a killed writer left in ``folder``; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f"**/.*{TEMP_MARK}*" if recursive else f".*{TEMP_MARK}*"
    removed = 0
    for stale in folder.glob(pattern):
        if stale.is_file() and not stale.is_symlink():
            stale.unlink(missing_ok=True)
            removed += 1
    return removed
