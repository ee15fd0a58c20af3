"""One resumable store: the settings a run started with, and its parts, committed one at a time.

A run's state is a settings file (``run.json``) and a folder of parts (``<prefix>-NNNNNN.parquet``). Every job
that must survive ``kill -9`` (align chunks, embedding shards, IJB-C feature shards) keeps this one protocol:

- **Settings check.** ``start`` records the settings that decide the outputs. A rerun with the same settings
  resumes; other settings are refused with one error text (naming the keys that differ) unless ``overwrite``,
  which first hands the old parts to ``discard`` (so the job can remove what the old settings wrote), then
  deletes them.
- **Commit of a part.** The part's outputs are written first (each through ``facepipe.io.atomic``), then its
  marker: the part's table (one row per item, with the item's key), written atomically and fsynced. A marker's
  presence means the part and its outputs are complete: a kill loses at most the parts in flight.
- **Done parts, done keys.** The input list is not a setting: each part's table records the keys it covered, so
  a rerun on an input that gained or lost items does only the keys not yet done (``done_keys``) as new parts
  (``next_part_id``), and ``merge`` keeps the rows whose key is still an input.
- **Merge.** The parts' tables concatenated (optionally filtered and sorted), written atomically.
- **One run at a time.** ``start`` takes an exclusive lock (``flock`` on ``<state>.lock``) held until ``close``
  or the process's death; a second run into the same folder fails at once, naming the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Collection

import pyarrow as pa
import pyarrow.parquet as pq

from facepipe.io.atomic import atomic_path, atomic_write_text, cleanup_temporaries


class RunStateError(RuntimeError):
    """The folder holds a run with other settings, a corrupt state, or a run in progress."""


def settings_mismatch(folder: Path, previous: dict[str, Any], current: dict[str, Any]) -> RunStateError:
    changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    return RunStateError(
        f"{folder} holds a run with other settings ({', '.join(changed)} differ); resume with the same options, "
        "use another output folder, or pass --overwrite (which removes what the old run wrote)"
    )


def write_table_atomic(table: pa.Table, path: str | os.PathLike) -> None:
    """A parquet file that appears complete or not at all, flushed to disk (resumes rely on it)."""
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, tmp)


class RunState:
    """The settings file and committed parts of one resumable run (see the module docstring)."""

    def __init__(self, run_file: str | os.PathLike, parts_dir: str | os.PathLike, prefix: str = "part") -> None:
        self.run_file = Path(run_file)
        self.parts_dir = Path(parts_dir)
        self.prefix = prefix
        self.lock_file = self.run_file.with_suffix(".lock")
        self._lock_fd: int | None = None
        self.created = False  # True when ``start`` began a new run (no settings file was there)

    # ------------------------------------------------------------------------------------------ settings

    def previous_settings(self) -> dict[str, Any] | None:
        if not self.run_file.is_file():
            return None
        try:
            return json.loads(self.run_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunStateError(f"{self.run_file} is unreadable ({exc}); pass --overwrite to start over") from None

    def start(
        self,
        settings: dict[str, Any],
        overwrite: bool = False,
        discard: Callable[[pa.Table], None] | None = None,
    ) -> None:
        """Lock the run, clean a killed run's temporary files, then resume (same settings), refuse (other
        settings) or start over (``overwrite``: ``discard`` gets the old parts' rows before they are deleted)."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.acquire_lock()
        cleanup_temporaries(self.parts_dir)
        cleanup_temporaries(self.run_file.parent)
        encoded = json.loads(json.dumps(settings, sort_keys=True, default=str))
        try:
            previous = self.previous_settings()
        except RunStateError:
            if not overwrite:
                raise
            previous = None  # unreadable: --overwrite starts over without it
        if previous is not None and previous != encoded and not overwrite:
            raise settings_mismatch(self.run_file.parent, previous, encoded)
        if overwrite and self.done_parts():
            if discard is not None:
                discard(self.read_parts())
            for part_id in self.done_parts():
                self.part_path(part_id).unlink(missing_ok=True)
        self.created = previous is None
        if previous != encoded:
            atomic_write_text(self.run_file, json.dumps(encoded, sort_keys=True, indent=1), fsync=True)

    def abandon(self) -> None:
        """Undo a ``start`` that committed nothing (a run that failed before any work must not claim the folder)."""
        if self.created and not self.done_parts():
            self.run_file.unlink(missing_ok=True)
            self.lock_file.unlink(missing_ok=True)
            for folder in (self.parts_dir, self.run_file.parent):
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty or not ours
        self.close()

    # ------------------------------------------------------------------------------------------ parts

    def part_path(self, part_id: int) -> Path:
        return self.parts_dir / f"{self.prefix}-{part_id:06d}.parquet"

    def done_parts(self) -> list[int]:
        ids = []
        for path in self.parts_dir.glob(f"{self.prefix}-*.parquet"):
            suffix = path.stem[len(self.prefix) + 1 :]
            if suffix.isdigit():
                ids.append(int(suffix))
        return sorted(ids)

    def next_part_id(self) -> int:
        done = self.done_parts()
        return done[-1] + 1 if done else 0

    def commit_part(self, part_id: int, table: pa.Table) -> None:
        """Write the part's marker. Call it after the part's outputs are in place."""
        write_table_atomic(table, self.part_path(part_id))

    def read_parts(self, schema: pa.Schema | None = None, part_ids: Collection[int] | None = None) -> pa.Table | None:
        """The committed parts' rows, in part order; ``None`` when there are none and no schema is given."""
        ids = self.done_parts() if part_ids is None else sorted(part_ids)
        tables = []
        for part_id in ids:
            try:
                tables.append(pq.read_table(self.part_path(part_id), schema=schema))
            except (OSError, pa.ArrowException) as exc:
                raise RunStateError(
                    f"{self.part_path(part_id)} is unreadable ({exc}); delete it to redo that part, or pass --overwrite"
                ) from None
        if not tables:
            return schema.empty_table() if schema is not None else None
        return pa.concat_tables(tables)

    def done_keys(self, column: str = "key", schema: pa.Schema | None = None) -> set[str]:
        table = self.read_parts(schema)
        return set() if table is None else set(table.column(column).to_pylist())

    def merge(
        self,
        path: str | os.PathLike,
        schema: pa.Schema | None = None,
        keep_keys: Collection[str] | None = None,
        key_column: str = "key",
        sort_by: str | None = None,
    ) -> pa.Table:
        """Concatenate the parts (only rows whose key is in ``keep_keys``, when given), optionally sorted, and
        write them atomically to ``path``."""
        table = self.read_parts(schema)
        if table is None:
            raise RunStateError(f"{self.parts_dir} holds no committed parts to merge")
        if keep_keys is not None:
            import pyarrow.compute as pc

            table = table.filter(pc.is_in(table.column(key_column), value_set=pa.array(sorted(keep_keys), table.schema.field(key_column).type)))
        if sort_by is not None:
            table = table.sort_by(sort_by)
        write_table_atomic(table, path)
        return table

    # ------------------------------------------------------------------------------------------ lock

    def acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunStateError(
                f"{self.run_file.parent} is in use by {holder}; wait for that run to end or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)[:300]
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} ({command})\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the lock (the process's death releases it too). A released lock names nobody: the file is
        emptied first, so a finished run leaves the same state files whoever ran it."""
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
