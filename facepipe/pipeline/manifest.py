"""The align manifest: one parquet row per input, written in per-chunk parts of one ``RunState``.

A run keeps its state under ``<out>/.facepipe/``: ``run.json`` (the settings that decide the outputs; not the
input list) and ``parts/chunk-NNNNNN.parquet`` (one per committed chunk, one row per item of the chunk). A part
is written only after its outputs are in place (``facepipe.io.run_state``), so a part's presence means its items
are done: a rerun skips them, and a kill loses at most the chunks in flight. ``merge`` writes the final
manifest: the rows of the *current* inputs, in input order.

Columns (``MANIFEST_SCHEMA``):

- ``index``: the row's position in the current input list (the manifest is sorted by it). It is given again at
  every merge, so after a rerun on a grown data set it is the position in the new list.
- ``key`` (the input's relative POSIX path), ``source`` (what was read: a file path or ``train.rec#123``),
  ``status`` (ok / no_face / error), ``reason`` (why not ok), ``outputs`` (the crops' names relative to the
  output folder; several with ``--keep all``).
- ``width``, ``height`` (the original image's pixels), ``num_detected`` (faces above ``--min-score`` before
  ``--keep`` chose), ``decode_scale`` (> 1 when a large JPEG was decoded reduced), ``padded_retry``.
- per written crop: ``boxes`` (x1, y1, x2, y2; NaN when a landmarks file gave the points), ``scores`` and
  ``landmarks`` (5 points as ``[x, y]`` pairs, in image order), all in the original image's pixels.

**Names that are not UTF-8.** File names are bytes; Python gives undecodable bytes as surrogate escapes
(``os.fsdecode``), which Arrow strings (UTF-8) cannot hold. ``key``, ``source`` and ``outputs`` are stored
through ``encode_name``: a backslash is doubled and each undecodable byte written ``\\xNN``; every other
character is kept. ``decode_name`` (used by ``read_manifest``) gives back the exact ``str`` that ``os.listdir``
gives. Names without a backslash or an undecodable byte are stored unchanged.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from facepipe.io.atomic import TEMP_MARK, temporary_path
from facepipe.io.run_state import RunState, RunStateError, write_table_atomic

__all__ = [
    "MANIFEST_SCHEMA", "ManifestRow", "ManifestStore", "RunStateError", "STATUSES", "decode_name", "encode_name",
    "read_detector_scores", "read_manifest", "rows_to_table", "status_counts", "table_to_rows",
]

STATUSES = ("ok", "no_face", "error")
MANIFEST_VERSION = 3  # 2: landmarks as (5, 2) pairs, names escaped, input list no longer a setting; 3: quality columns

MANIFEST_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("outputs", pa.list_(pa.string())),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_detected", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("scores", pa.list_(pa.float32())),
        ("landmarks", pa.list_(pa.list_(pa.list_(pa.float32(), 2), 5))),
        ("padded_retry", pa.bool_()),
        ("decode_scale", pa.float32()),
        # per crop, facepipe.quality's measures: eye distance (original pixels), signed yaw (degrees), sharpness
        ("inter_ocular", pa.list_(pa.float32())),
        ("yaw", pa.list_(pa.float32())),
        ("sharpness", pa.list_(pa.float32())),
    ]
)
_NAME_COLUMNS = ("key", "source")


@dataclass
class ManifestRow:
    """One input's outcome (see the module docstring for each field)."""

    index: int
    key: str
    source: str
    status: str
    reason: str = ""
    outputs: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    num_detected: int = 0
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    landmarks: list[list[list[float]]] = field(default_factory=list)  # per crop: 5 x [x, y]
    padded_retry: bool = False
    decode_scale: float = 1.0
    inter_ocular: list[float] = field(default_factory=list)
    yaw: list[float] = field(default_factory=list)
    sharpness: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


# ------------------------------------------------------------------------------------------------ names

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def encode_name(name: str) -> str:
    """A file name (possibly holding surrogate escapes) as valid UTF-8 text, reversibly (module docstring)."""
    if "\\" not in name and name.isascii():
        return name
    raw = os.fsencode(name.replace("\\", "\\\\"))
    return raw.decode("utf-8", "backslashreplace")


def decode_name(stored: str) -> str:
    """The inverse of ``encode_name``."""
    if "\\" not in stored:
        return stored
    out = bytearray()
    position = 0
    for match in _ESCAPE.finditer(stored):
        out += stored[position : match.start()].encode("utf-8")
        token = match.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        position = match.end()
    out += stored[position:].encode("utf-8")
    return os.fsdecode(bytes(out))


def _text(value: str) -> str:
    """Free text (reasons) as valid UTF-8: a surrogate escape shows as ``\\udcNN`` (readable, not reversed)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def rows_to_table(rows: Sequence[ManifestRow]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for row in rows:
        for name, value in asdict(row).items():
            if name in _NAME_COLUMNS:
                value = encode_name(value)
            elif name == "outputs":
                value = [encode_name(v) for v in value]
            elif name == "reason":
                value = _text(value)
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def table_to_rows(table: pa.Table) -> list[ManifestRow]:
    rows = []
    for record in table.select(MANIFEST_SCHEMA.names).to_pylist():
        for name in _NAME_COLUMNS:
            record[name] = decode_name(record[name])
        record["outputs"] = [decode_name(v) for v in record["outputs"] or []]
        rows.append(ManifestRow(**record))
    return rows


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    return table_to_rows(pq.read_table(path, schema=MANIFEST_SCHEMA))


def read_detector_scores(path: str | os.PathLike) -> dict[str, float]:
    """``crop name -> detector score`` from an align manifest (names decoded as ``os.listdir`` gives them)."""
    table = pq.read_table(path, columns=["outputs", "scores"])
    scores: dict[str, float] = {}
    for outputs, values in zip(table.column("outputs").to_pylist(), table.column("scores").to_pylist()):
        for name, score in zip(outputs or [], values or []):
            if score is not None:
                scores[decode_name(name)] = float(score)
    return scores


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for status in statuses:
        counts[status] += 1
    return counts


# ------------------------------------------------------------------------------------------------ store


class ManifestStore:
    """The align run's ``RunState`` under ``<out>/.facepipe`` (chunk parts of manifest rows), plus the staging
    folder where sinks write temporary files (emptied at every start)."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.state_dir = Path(out_dir) / ".facepipe"
        self.parts_dir = self.state_dir / "parts"
        self.staging_dir = self.state_dir / "staging"
        self.state = RunState(self.state_dir / "run.json", self.parts_dir, prefix="chunk")

    def previous_settings(self) -> dict[str, Any] | None:
        return self.state.previous_settings()

    def start(
        self, settings: dict[str, Any], overwrite: bool = False, discard: Callable[[list[str]], None] | None = None
    ) -> None:
        """Lock, clean a killed run's temporary files, then resume / refuse / start over (``RunState.start``).
        On ``overwrite``, ``discard`` gets the output names the old parts list, before they are deleted."""
        settings = {**settings, "manifest_version": MANIFEST_VERSION}

        def discard_rows(table: pa.Table) -> None:
            if discard is not None and "outputs" in table.column_names:
                discard([decode_name(name) for names in table.column("outputs").to_pylist() for name in names or []])

        self.state.start(settings, overwrite=overwrite, discard=discard_rows)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.staging_dir.iterdir():  # a killed run's temporary crops
            if stale.is_file():
                stale.unlink()

    def done_parts(self) -> list[int]:
        return self.state.done_parts()

    def part(self, chunk_id: int) -> pa.Table:
        return self.state.read_parts(MANIFEST_SCHEMA, part_ids=[chunk_id])

    def commit_chunk(self, chunk_id: int, rows: Sequence[ManifestRow]) -> None:
        self.state.commit_part(chunk_id, rows_to_table(rows))

    def merged(self, keys: Sequence[str]) -> pa.Table:
        """The manifest of the inputs ``keys``, in this order (``index`` = position): committed rows of keys no
        longer in the input are left out."""
        position = {encode_name(key): i for i, key in enumerate(keys)}
        table = self.state.read_parts(MANIFEST_SCHEMA)
        stored = table.column("key").to_pylist()
        keep = [i for i, key in enumerate(stored) if key in position]
        table = table.take(pa.array(keep, pa.int64()))
        index = pa.array([position[stored[i]] for i in keep], pa.int64())
        return table.set_column(0, MANIFEST_SCHEMA.field("index"), index).sort_by("index")

    @staticmethod
    def write(table: pa.Table, manifest_path: str | os.PathLike) -> None:
        write_table_atomic(table, manifest_path)  # the temporary path creates the folder

    def close(self) -> None:
        self.state.close()

    def abandon(self) -> None:
        """Undo a start that committed nothing (``RunState.abandon``), staging folder included."""
        if self.state.created and not self.state.done_parts():
            try:
                self.staging_dir.rmdir()
            except OSError:
                pass
        self.state.abandon()


def check_writable(path: str | os.PathLike) -> None:
    """Fail now (PermissionError / OSError) when a file cannot be created at ``path``: a run must not find out
    after all its work that its manifest cannot be written. Nothing is left behind."""
    path = Path(path)
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    tmp = temporary_path(path)
    tmp.unlink()
    for folder in created:  # the folders made for the probe: the run makes them again when it writes
        try:
            folder.rmdir()
        except OSError:
            break


def cleanup_beside(path: str | os.PathLike) -> int:
    """Remove the temporary files a killed atomic write of ``path`` left beside it (and only those)."""
    path = Path(path)
    removed = 0
    for stale in path.parent.glob(f".{path.name[:200]}.*{TEMP_MARK}*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed += 1
    return removed


def keys_of(table: pa.Table) -> list[str]:
    """The decoded keys of a manifest table."""
    return [decode_name(key) for key in table.column("key").to_pylist()]

