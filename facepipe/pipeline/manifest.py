"""The align manifest: one parquet row per input, written in per-chunk parts committed atomically.

A run keeps its state under ``<out>/.facepipe/``: ``run.json`` (the settings and inputs the run was started
with) and ``parts/chunk-NNNNNN.parquet`` (one per finished chunk). A chunk's part is written only after its
outputs are in place, so a part's presence means the chunk is done: a rerun skips it, and a kill loses at most
the chunks in flight. ``merge`` concatenates the parts into the final manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

STATUSES = ("ok", "no_face", "error")

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
        ("landmarks", pa.list_(pa.list_(pa.float32(), 10))),
        ("padded_retry", pa.bool_()),
        ("decode_scale", pa.float32()),
    ]
)


@dataclass
class ManifestRow:
    """One input's outcome. Boxes / landmarks are in the original image's pixels, one entry per written crop;
    ``num_detected`` counts faces above the score threshold before ``--keep`` chose among them."""

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
    landmarks: list[list[float]] = field(default_factory=list)
    padded_retry: bool = False
    decode_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


def rows_to_table(rows: Sequence[ManifestRow]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for row in rows:
        for name, value in asdict(row).items():
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStateError(RuntimeError):
    """The output folder holds a run started with other settings or inputs."""


class ManifestStore:
    """Per-chunk manifest parts and the run's settings under ``<out>/.facepipe``."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.state_dir = Path(out_dir) / ".facepipe"
        self.parts_dir = self.state_dir / "parts"
        self.staging_dir = self.state_dir / "staging"

    def start(self, run_settings: dict[str, Any], overwrite: bool = False) -> None:
        """Create the state folders, or check that an existing run had the same settings (resume)."""
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.staging_dir.iterdir():  # temp files of a killed run
            stale.unlink()
        for stale in self.parts_dir.glob("*.tmp"):
            stale.unlink()
        run_file = self.state_dir / "run.json"
        encoded = json.dumps(run_settings, sort_keys=True, indent=1)
        if run_file.exists() and not overwrite:
            previous = json.loads(run_file.read_text())
            if previous != json.loads(encoded):
                changed = sorted(k for k in set(previous) | set(run_settings) if previous.get(k) != run_settings.get(k))
                raise RunStateError(
                    f"{self.state_dir.parent} holds a run with other settings or inputs ({', '.join(changed)} "
                    "differ); resume with the same options, use another --out, or pass --overwrite"
                )
        if overwrite:
            for part in self.parts_dir.glob("chunk-*.parquet"):
                part.unlink()
        tmp = run_file.with_name("run.json.tmp")
        tmp.write_text(encoded)
        os.replace(tmp, run_file)

    def part_path(self, chunk_id: int) -> Path:
        return self.parts_dir / f"chunk-{chunk_id:06d}.parquet"

    def done_chunks(self) -> set[int]:
        return {int(p.stem.split("-")[1]) for p in self.parts_dir.glob("chunk-*.parquet")}

    def commit_chunk(self, chunk_id: int, rows: Sequence[ManifestRow]) -> None:
        write_parquet_atomic(rows_to_table(rows), self.part_path(chunk_id))

    def read_parts(self) -> pa.Table:
        parts = sorted(self.parts_dir.glob("chunk-*.parquet"))
        tables = [pq.read_table(p, schema=MANIFEST_SCHEMA) for p in parts]
        if not tables:
            return MANIFEST_SCHEMA.empty_table()
        return pa.concat_tables(tables).sort_by("index")

    def merge(self, manifest_path: str | os.PathLike) -> pa.Table:
        table = self.read_parts()
        manifest_path = Path(manifest_path)
        manifest_path.parent.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(table, manifest_path)
        return table


def status_counts(statuses: Iterable[str]) -> dict[str, int]:
    counts = {status: 0 for status in STATUSES}
    for status in statuses:
        counts[status] += 1
    return counts


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    table = pq.read_table(path, schema=MANIFEST_SCHEMA)
    return [ManifestRow(**record) for record in table.to_pylist()]
