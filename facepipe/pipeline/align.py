"""The align job: read -> decode -> detect (batched) -> choose faces -> warp -> encode -> write, resumably.

``AlignWorker`` is the per-batch work: a plain, picklable object that decodes, detects, aligns and encodes a batch
of items and returns their manifest rows plus encoded crops as one Arrow table (``ALIGN_RESULT_SCHEMA``).
``AlignJob`` is the rest, a ``facepipe.engine.job.BatchJob`` any engine runs: the items in a fixed order, which
of them are still to do (chunks = units, item lists = batches), naming (``sinks.OutputNames``), the sink and the
manifest store (``manifest.ManifestStore``, a ``RunState``).

**Growing data sets.** The input list is not a setting. A rerun on an input that gained files aligns only the
new ones (as new chunks, in input order) and keeps the finished ones; a rerun on an input that lost files deletes
the outputs of the files that are gone (counted in the summary) and drops their rows; an input that shares no
file with the run is refused (a wrong INPUT or ``--root`` must not empty the folder). The manifest is then
rewritten for the current input. Changed *settings* are refused unless ``--overwrite``, which first deletes what
the old settings wrote. Fresh and resumed runs are chunked by the fixed grid (``chunk_size`` items by input
position): a grid chunk that no committed part touched keeps its grid number, so they give the same chunks,
names, outputs and manifest as an uninterrupted run.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import pyarrow as pa

from facepipe.alignment import estimate_norm, warp_crops
from facepipe.engine.job import Unit
from facepipe.faces import detect_padded, pad_image
from facepipe.io.atomic import cleanup_temporaries
from facepipe.io.images import ImageDecodeError, decode_image_bounded
from facepipe.pipeline.face_choice import KEEP_MODES, choose_faces
from facepipe.pipeline.manifest import (
    MANIFEST_SCHEMA,
    ManifestRow,
    ManifestStore,
    RunStateError,
    check_writable,
    cleanup_beside,
    decode_name,
    keys_of,
    rows_to_table,
    status_counts,
    table_to_rows,
)
from facepipe.pipeline.sinks import SINK_KINDS, CommittedCrop, OutputNames, create_sink, identity_labels, output_folders
from facepipe.pipeline.sources import Item, Source, reader_only
from facepipe.quality import inter_ocular_distance, landmark_yaw, laplacian_sharpness
from facepipe.types import Face

__all__ = [
    "ALIGN_RESULT_SCHEMA", "AlignConfig", "AlignJob", "AlignSummary", "AlignWorker", "DownscalingDetector",
    "align_detector", "encode_crop", "pad_image", "run_align",
]

IMAGE_FORMATS = ("jpg", "png")

# What a worker returns per batch: the manifest row columns, plus the row's encoded crops.
ALIGN_RESULT_SCHEMA = pa.schema([*MANIFEST_SCHEMA, pa.field("crops", pa.list_(pa.binary()))])


@dataclass(frozen=True)
class AlignConfig:
    """Everything that decides the outputs (recorded in the run's settings, so a resume must match it)."""

    size: int | tuple[int, int] = 112
    keep: str = "largest"
    min_score: float = 0.5
    retry_padded: bool = False
    pad_ratio: float = 0.5
    image_format: str = "jpg"
    jpeg_quality: int = 95
    max_pixels: int = 50_000_000
    detect_max_side: int | None = 2560
    detector: str = "retinaface"
    detector_weights: str | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)
    landmarks_file: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}")
        if not 0 <= self.jpeg_quality <= 100:
            raise ValueError("JPEG quality must be within 0..100")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError("min score must be within 0..1")
        if self.pad_ratio <= 0:
            raise ValueError("pad ratio must be positive")
        if self.max_pixels < 1:
            raise ValueError(f"max pixels must be at least 1, got {self.max_pixels}")
        if self.detect_max_side is not None and self.detect_max_side < 1:
            raise ValueError(f"detect max side must be at least 1 (or None: never downscale), got {self.detect_max_side}")
        sides = self.size if isinstance(self.size, tuple) else (self.size,)
        if any(side < 1 for side in sides):
            raise ValueError(f"crop size must be positive, got {self.size}")
        from facepipe.alignment import arcface_template

        arcface_template(self.size)  # raises for unsupported sizes

    def output_settings(self) -> dict[str, Any]:
        """The settings that change outputs (device is not one of them)."""
        settings = asdict(self)
        settings.pop("device")
        settings["size"] = list(self.size) if isinstance(self.size, tuple) else self.size
        return settings


@dataclass
class ItemResult:
    row: ManifestRow
    crops: list[bytes]


def encode_crop(crop: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    """Deterministic encoding: fixed parameters, no timestamps (same pixels -> same bytes)."""
    if image_format == "png":
        ok, buffer = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buffer = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {crop.shape} crop as {image_format}")
    return buffer.tobytes()


def results_to_table(results: Sequence[ItemResult]) -> pa.Table:
    rows = rows_to_table([result.row for result in results])
    return rows.append_column(ALIGN_RESULT_SCHEMA.field("crops"), pa.array([r.crops for r in results], pa.list_(pa.binary())))


def table_to_results(table: pa.Table) -> list[ItemResult]:
    return [ItemResult(row, crops) for row, crops in zip(table_to_rows(table), table.column("crops").to_pylist())]


# ------------------------------------------------------------------------------------------------ detector


class DownscalingDetector:
    """A detector that sees images whose longer side exceeds ``max_side`` downscaled (INTER_AREA), with faces
    back in full-size pixels: detection cost stays bounded while crops come from the full image."""

    def __init__(self, detector: Any, max_side: int | None) -> None:
        self.detector = detector
        self.max_side = max_side

    def _resized(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        longest = max(image.shape[:2])
        if self.max_side is None or longest <= self.max_side:
            return image, 1.0
        scale = self.max_side / longest
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        if not images:
            return []
        resized = [self._resized(image) for image in images]
        detections = self.detector.detect([image for image, _ in resized])
        return [
            faces if scale == 1.0 else [face.scaled(1.0 / scale) for face in faces]
            for faces, (_, scale) in zip(detections, resized)
        ]


def align_confidence_threshold(min_score: float, options: dict[str, Any]) -> float:
    """RetinaFace's pre-NMS score filter for align: just below ``min_score`` instead of 0.02.

    Align discards faces under ``min_score`` anyway, and in greedy NMS a lower-scored box never suppresses a
    higher-scored one, so dropping them before NMS leaves every returned face unchanged while decoding and
    NMS skip the low-score candidates. The filter is strict (score > t) on float32 scores, so t is the float32
    right below ``min_score``. Multi-scale voting averages low-score boxes into the result: keep its default.
    """
    default = RETINAFACE_CONFIDENCE_THRESHOLD
    if options.get("scale", "original") == "multiscale" or min_score <= default:
        return default
    return float(np.nextafter(np.float32(min_score), np.float32(0.0)))


RETINAFACE_CONFIDENCE_THRESHOLD = 0.02  # RetinaFaceSettings' default (the reference's pre-NMS filter)


def align_detector(config: AlignConfig, onnx_model: str | None = None, device: str | None = None) -> DownscalingDetector:
    """The detector as align runs it: RetinaFace keeps faces down to ``min_score`` (its own threshold is 0.5) and
    filters candidates just below it before NMS; images over ``detect_max_side`` are detected downscaled.
    ``onnx_model``: RetinaFace already exported (``exported_retinaface``), loaded instead of exported again."""
    from facepipe.detection import create_detector, pipeline_detector_options

    device = config.device if device is None else device
    options = pipeline_detector_options(config.detector, config.detector_options)  # e.g. MTCNN zero edge padding
    if config.detector.startswith("retinaface"):
        options.setdefault("threshold", config.min_score)
        options.setdefault("confidence_threshold", align_confidence_threshold(config.min_score, options))
    elif config.detector == "scrfd":  # SCRFD's det_thresh (0.5) would likewise floor --min-score
        options.setdefault("threshold", config.min_score)
    if onnx_model is not None and os.path.isfile(onnx_model):  # (on another machine of a cluster it may not be)
        options["backend"] = "onnxruntime"
        detector = create_detector("retinaface-onnx", onnx_model, device, **options)
    else:
        detector = create_detector(config.detector, config.detector_weights, device, **options)
    return DownscalingDetector(detector, config.detect_max_side)


def exported_retinaface(config: AlignConfig, scratch: Path, device: str) -> str | None:
    """The cached ONNX export of the detector that workers on ``device`` load instead of exporting it each
    (``facepipe.detection.onnx_cache``); None when there is none to share (landmarks file, GPU, other detector)."""
    from facepipe.detection.onnx_cache import worker_onnx_model

    if config.landmarks_file is not None:
        return None
    return worker_onnx_model(config.detector, config.detector_weights, device, config.detector_options, scratch)


# ------------------------------------------------------------------------------------------------ worker


@dataclass
class Decoded:
    """One item after decoding: the image (None when it failed), its decode scale (x, y; > 1 for a JPEG decoded
    reduced) and why it failed."""

    image: np.ndarray | None
    scale: tuple[float, float] = (1.0, 1.0)
    error: str = ""


def decode_item(source: Source, item: Item, max_pixels: int) -> Decoded:
    """An item read from its source and decoded within ``max_pixels`` (JPEGs over it at 1/2..1/8 size), or why not."""
    try:
        image, scale = decode_image_bounded(source.read(item), max_pixels)
        return Decoded(image, scale)
    except ImageDecodeError as exc:
        return Decoded(None, error=str(exc))
    except (OSError, ValueError, KeyError) as exc:
        return Decoded(None, error=f"cannot read: {exc}")


class AlignWorker:
    """Processes batches of items (``__call__``: an Arrow table of ``ALIGN_RESULT_SCHEMA``). Built from picklable
    parts; the detector is created on first use (in the process that uses it) or by ``prepare``."""

    def __init__(self, config: AlignConfig, source: Source, onnx_model: str | None = None) -> None:
        self.config = config
        self.source = source
        self.onnx_model = onnx_model  # RetinaFace already exported to ONNX: loaded, not exported again
        self._detector: DownscalingDetector | None = None
        self._landmarks: dict[str, Face] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_detector"] = None
        state["_landmarks"] = None
        return state

    @property
    def detector(self) -> DownscalingDetector:
        if self._detector is None:
            self._detector = align_detector(self.config, self.onnx_model)
        return self._detector

    @property
    def landmarks(self) -> dict[str, Face]:
        if self._landmarks is None:
            from facepipe.pipeline.landmarks_file import read_landmarks_file

            self._landmarks = read_landmarks_file(self.config.landmarks_file)
        return self._landmarks

    def prepare(self) -> None:
        """Load the detector or the landmarks file now, so that bad weights or files fail before any work."""
        if self.config.landmarks_file is not None:
            _ = self.landmarks
        else:
            _ = self.detector

    def __call__(self, batch: Sequence[Item]) -> pa.Table:
        return results_to_table(self.process(batch))

    def process(self, items: Sequence[Item]) -> list[ItemResult]:
        """One result per item, in order. An unexpected failure inside a batch is retried item by item so that
        only the item that causes it becomes an ``error`` row."""
        try:
            return self._process_batch(items)
        except Exception as exc:  # noqa: BLE001 - recorded in the manifest, the run goes on
            if len(items) == 1:
                return [_failed(items[0], f"processing failed: {type(exc).__name__}: {exc}")]
        results = []
        for item in items:
            try:
                results.extend(self._process_batch([item]))
            except Exception as exc:  # noqa: BLE001
                results.append(_failed(item, f"processing failed: {type(exc).__name__}: {exc}"))
        return results

    def _decode(self, item: Item) -> Decoded:
        return decode_item(self.source, item, self.config.max_pixels)

    def _faces_for(self, items: Sequence[Item], decoded: Sequence[Decoded], rows: Sequence[ManifestRow]) -> dict[int, list[Face]]:
        """The kept faces of each decoded item (by position), in the decoded image's pixels."""
        cfg = self.config
        good = [i for i, d in enumerate(decoded) if d.image is not None]
        faces: dict[int, list[Face]] = {}
        if cfg.landmarks_file is not None:
            for i in good:
                face = self.landmarks.get(items[i].key)
                sx, sy = decoded[i].scale
                faces[i] = [] if face is None else [face.scaled(1 / sx, 1 / sy)]
                rows[i].num_detected = len(faces[i])
            return faces
        for i, found in zip(good, detect_padded(self.detector, [decoded[i].image for i in good])):
            faces[i] = choose_faces(found, decoded[i].image.shape, cfg.keep, cfg.min_score)
            rows[i].num_detected = sum(face.score >= cfg.min_score for face in found)
        if cfg.retry_padded:
            retry = [i for i in good if not faces[i]]
            for i, found in zip(retry, detect_padded(self.detector, [decoded[i].image for i in retry], cfg.pad_ratio)):
                faces[i] = choose_faces(found, decoded[i].image.shape, cfg.keep, cfg.min_score)
                rows[i].num_detected = sum(face.score >= cfg.min_score for face in found)
                rows[i].padded_retry = True
        return faces

    def _crops_for(self, decoded: Decoded, faces: list[Face], row: ManifestRow) -> list[bytes]:
        """Warp and encode the kept faces, filling the row's per-crop fields (original image's pixels)."""
        cfg = self.config
        if not faces:
            row.status = "no_face"
            row.reason = "not in landmarks file" if cfg.landmarks_file is not None else "no face detected"
            return []
        matrices = estimate_norm(np.stack([face.landmarks for face in faces]), cfg.size)
        finite = np.isfinite(matrices).all(axis=(1, 2))  # coincident landmarks have no similarity transform
        if not finite.any():
            row.reason = "degenerate landmarks (all points coincide): cannot align"
            return []
        faces = [face for face, ok in zip(faces, finite) if ok]
        crops = warp_crops(decoded.image, matrices[finite], cfg.size)
        row.status = "ok"
        sx, sy = decoded.scale
        originals = [face.scaled(sx, sy) for face in faces]
        landmarks = np.stack([np.asarray(face.landmarks, np.float64).reshape(5, 2) for face in originals])
        row.boxes = [[float(v) for v in original.box] for original in originals]
        row.scores = [float(face.score) for face in faces]
        row.landmarks = landmarks.tolist()
        row.inter_ocular = inter_ocular_distance(landmarks).tolist()
        row.yaw = landmark_yaw(landmarks).tolist()
        row.sharpness = laplacian_sharpness(crops).tolist()
        return [encode_crop(crop, cfg.image_format, cfg.jpeg_quality) for crop in crops]

    def _process_batch(self, items: Sequence[Item]) -> list[ItemResult]:
        decoded = [self._decode(item) for item in items]
        rows = [ManifestRow(item.index, item.key, item.source, "error", d.error) for item, d in zip(items, decoded)]
        for d, row in zip(decoded, rows):
            if d.image is not None:
                row.width, row.height = round(d.image.shape[1] * d.scale[0]), round(d.image.shape[0] * d.scale[1])
                row.decode_scale = float(max(d.scale))
        faces = self._faces_for(items, decoded, rows)
        return [
            ItemResult(row, self._crops_for(d, faces[i], row) if i in faces else [])
            for i, (d, row) in enumerate(zip(decoded, rows))
        ]


def _failed(item: Item, reason: str) -> ItemResult:
    return ItemResult(ManifestRow(item.index, item.key, item.source, "error", reason), [])


# ------------------------------------------------------------------------------------------------ job


@dataclass
class AlignSummary:
    counts: dict[str, int]
    processed: int
    skipped: int
    crops_written: int
    seconds: float
    manifest_path: Path
    removed: int = 0  # inputs gone from the input since an earlier run: their outputs deleted
    not_kept: tuple[int, int] = (0, 0)  # (faces above --min-score that --keep left out, images holding them)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def faces_not_kept(self) -> tuple[int, int]:
        """(faces above --min-score that --keep left out, images holding them), counted from the manifest."""
        return self.not_kept

    def format(self) -> str:
        counts = ", ".join(f"{status} {n}" for status, n in self.counts.items())
        not_kept, images = self.faces_not_kept()
        gone = f"; {self.removed} inputs gone since the last run: their outputs removed" if self.removed else ""
        return (
            f"{self.processed} images processed ({self.skipped} already done) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s; {counts}; {self.crops_written} crops written{gone}; "
            f"{not_kept} detected faces not kept (--keep) in {images} images; manifest {self.manifest_path}"
        )




class AlignJob:
    """One align run over ``out_dir`` as a ``BatchJob`` (see the module docstring). Use it as a context manager:
    an exception abandons a run that committed nothing (the folder is left as it was found), and the exit
    releases the run lock.

    Raises ``RunStateError`` (other settings, run in progress), ``ValueError`` (bad arguments, RecordIO output on
    an input whose identities are not grouped) and ``OSError`` (output or manifest not writable) before any work.
    """

    name = "align"

    def __init__(
        self,
        config: AlignConfig,
        source: Source,
        out_dir: str | os.PathLike,
        sink_kind: str = "dir",
        manifest_path: str | os.PathLike | None = None,
        chunk_size: int = 256,
        batch_size: int = 8,
        overwrite: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk size must be at least 1")
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if sink_kind not in SINK_KINDS:
            raise ValueError(f"unknown sink {sink_kind!r}; choose from {', '.join(SINK_KINDS)}")
        self.started = time.perf_counter()
        self.config, self.source, self.sink_kind = config, source, sink_kind
        self.device = config.device
        self.chunk_size, self.batch_size = chunk_size, batch_size
        self.out_dir = Path(out_dir)
        self.manifest_path = Path(manifest_path) if manifest_path is not None else self.out_dir / "manifest.parquet"
        items = source.items()
        self.labels = identity_labels(items)
        self.items = [replace(item, label=self.labels[item.identity]) if item.label < 0 else item for item in items]
        if sink_kind == "recordio":
            _check_grouped_by_identity(self.items)
        self.keys = [item.key for item in self.items]
        if len(set(self.keys)) != len(self.keys):
            twice = next(key for key, n in Counter(self.keys).items() if n > 1)
            raise ValueError(f"the input names {twice} more than once (each input must be named once)")
        self._made_out_dir = not self.out_dir.exists()
        check_writable(self.manifest_path)  # before any work: not after it
        self.store = ManifestStore(self.out_dir)
        self.sink = create_sink(sink_kind, self.out_dir, self.store.state_dir)
        try:
            self._start(overwrite)
        except BaseException:
            self.abandon()
            raise

    # ------------------------------------------------------------------------------------------ start

    def _start(self, overwrite: bool) -> None:
        try:
            previous = self.store.previous_settings() if overwrite else None
        except RunStateError:
            previous = None  # unreadable: the new run replaces it
        old_sink = create_sink(str((previous or {}).get("sink", self.sink_kind)), self.out_dir, self.store.state_dir)

        def discard(names: list[str]) -> None:
            self.manifest_path.unlink(missing_ok=True)
            old_sink.discard(names)

        settings = {**self.config.output_settings(), "sink": self.sink_kind, "chunk_size": self.chunk_size}
        self.store.start(settings, overwrite=overwrite, discard=discard)
        for folder in (self.out_dir, self.out_dir / "shards", self.store.state_dir / "recordio"):
            cleanup_temporaries(folder)  # a killed run's partial shards, train.rec, labels.tsv
        cleanup_beside(self.manifest_path)
        parts = {part_id: self.store.part(part_id) for part_id in self.store.done_parts()}
        self.removed = self._remove_gone_inputs(parts)
        self.part_of: dict[str, int] = {}  # key -> the chunk that committed it
        committed_names: list[str] = []
        for part_id, part in parts.items():
            for key, outputs in zip(keys_of(part), part.column("outputs").to_pylist()):
                self.part_of[key] = part_id
                committed_names.extend(decode_name(name) for name in outputs or [])
        self.names = OutputNames(self.config.image_format, self.config.keep == "all", output_folders(self.keys), committed_names)
        self.units = self._plan(set(parts))
        pending = {item.key for unit in self.units for batch in unit.batches for item in batch}
        self.stems = {item.key: self.names.stem(item.key) for item in self.items if item.key in pending}  # input order
        self.processed = sum(unit.items for unit in self.units)
        self.crops_written = 0

    def _remove_gone_inputs(self, parts: dict[int, pa.Table]) -> int:
        """Delete the outputs of committed inputs that are no longer in the input, then their rows (outputs
        first: a crash in between leaves rows whose outputs are gone, which the next run removes again); updates
        ``parts``. Refuses when *none* of the committed inputs is still an input: that is another data set (or
        another ``--root``), and deleting every output is what ``--overwrite`` is for."""
        current = set(self.keys)
        committed = {part_id: keys_of(part) for part_id, part in parts.items()}
        if committed and not any(key in current for keys in committed.values() for key in keys):
            n = sum(len(keys) for keys in committed.values())
            if n:
                raise RunStateError(
                    f"{self.out_dir} holds the outputs of {n} inputs none of which is in {self.source.description}; "
                    "check INPUT (and --root), use another output folder, or pass --overwrite to replace that run"
                )
        removed = 0
        for part_id, keys in committed.items():
            if all(key in current for key in keys):
                continue
            rows = table_to_rows(parts[part_id])
            gone = [row for row in rows if row.key not in current]
            self.sink.remove(part_id, [name for row in gone for name in row.outputs])
            self.store.commit_chunk(part_id, [row for row in rows if row.key in current])
            parts[part_id] = self.store.part(part_id)
            removed += len(gone)
        return removed

    def _plan(self, done_parts: set[int]) -> list[Unit]:
        """Pending items as units: each chunk of the fixed grid that no committed part touched keeps its number
        (a fresh or resumed run is chunked as it always was); the other pending items (inputs added among done
        ones) go into new chunks numbered after every other, in input order."""
        done = set(self.part_of)
        grid = [self.items[i : i + self.chunk_size] for i in range(0, len(self.items), self.chunk_size)]
        units: list[tuple[int, list[Item]]] = []
        leftovers: list[Item] = []
        for chunk_id, chunk in enumerate(grid):
            if chunk_id not in done_parts and not any(item.key in done for item in chunk):
                units.append((chunk_id, chunk))
            else:
                leftovers.extend(item for item in chunk if item.key not in done)
        next_id = max([*done_parts, *(chunk_id for chunk_id, _ in units), -1]) + 1
        for start in range(0, len(leftovers), self.chunk_size):
            units.append((next_id, leftovers[start : start + self.chunk_size]))
            next_id += 1
        units.sort(key=lambda unit: unit[1][0].index)  # in input order
        return [
            Unit(chunk_id, tuple(tuple(chunk[i : i + self.batch_size]) for i in range(0, len(chunk), self.batch_size)), len(chunk))
            for chunk_id, chunk in units
        ]

    # ------------------------------------------------------------------------------------------ BatchJob

    def pending(self) -> list[Unit]:
        return list(self.units)

    def worker(self, device: str | None = None) -> AlignWorker:
        """The per-batch worker for ``device`` (default: the config's); on CPU it carries the cached ONNX export
        of RetinaFace (exported here once, not in every worker process)."""
        device = self.device if device is None else device
        try:
            onnx_model = exported_retinaface(self.config, self.store.staging_dir, device)
        except Exception:  # noqa: BLE001 - e.g. bad weights: the worker builds the detector and reports it
            onnx_model = None
        return AlignWorker(replace(self.config, device=device), reader_only(self.source), onnx_model)

    def failed(self, batch: Sequence[Item], reason: str) -> pa.Table:
        return results_to_table([_failed(item, reason) for item in batch])

    def commit(self, unit: Unit, results: Sequence[pa.Table]) -> None:
        """Name the unit's crops, have the sink write them, then commit its manifest part (outputs first, so a
        committed part implies its outputs)."""
        items = [item for batch in unit.batches for item in batch]
        done = table_to_results(pa.concat_tables(results)) if results else []
        if [r.row.key for r in done] != [item.key for item in items]:
            raise ValueError(f"chunk {unit.id}: results do not cover exactly the chunk's items")
        entries = []
        for item, result in zip(items, done):
            stem = self.stems[item.key]
            if stem is None and result.crops:
                result.row.status, result.crops = "error", []
                result.row.reason = "its output folder would replace a crop of an earlier run (rename the folder, or --overwrite)"
                result.row.boxes, result.row.scores, result.row.landmarks = [], [], []
                result.row.inter_ocular, result.row.yaw, result.row.sharpness = [], [], []
            names = self.names.names(stem, len(result.crops)) if result.crops else []
            result.row.outputs = names
            entries.extend((item, name, data) for name, data in zip(names, result.crops))
        self.sink.write_chunk(unit.id, entries)
        self.store.commit_chunk(unit.id, [r.row for r in done])
        for item in items:
            self.part_of[item.key] = unit.id
        self.crops_written += len(entries)

    def finish(self) -> AlignSummary:
        """Complete the sink (RecordIO: build train.rec from the chunks), then write the manifest of the current
        inputs (last: a manifest means the outputs are complete)."""
        table = self.store.merged(self.keys)
        crops: list[CommittedCrop] = [
            (self.part_of[key], decode_name(name), self.items[index].label)
            for index, key, outputs in zip(
                table.column("index").to_pylist(), keys_of(table), table.column("outputs").to_pylist()
            )
            for name in outputs or []
        ]
        self.sink.finish(crops, self.labels)
        self.store.write(table, self.manifest_path)
        columns = table.select(["status", "num_detected", "outputs"]).to_pydict()
        left_out = [
            detected - len(outputs or [])
            for status, detected, outputs in zip(columns["status"], columns["num_detected"], columns["outputs"])
            if status == "ok" and detected > len(outputs or [])
        ]
        return AlignSummary(
            status_counts(columns["status"]), self.processed, len(self.items) - self.processed,
            self.crops_written, time.perf_counter() - self.started, self.manifest_path, self.removed,
            (sum(left_out), len(left_out)),
        )

    # ------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self.store.close()

    def abandon(self) -> None:
        """Leave the folder as found when nothing was committed (a failed start must not claim it)."""
        self.store.abandon()
        if self._made_out_dir:
            try:
                self.out_dir.rmdir()
            except OSError:
                pass  # not empty: something was written

    def __enter__(self) -> "AlignJob":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _check_grouped_by_identity(items: Sequence[Item]) -> None:
    seen: set[int] = set()
    previous = None
    for item in items:
        if item.label != previous:
            if item.label in seen:
                raise ValueError(
                    f"RecordIO output needs each identity's images together; {item.key} returns to identity "
                    f"{item.identity!r} after others (sort the file list)"
                )
            seen.add(item.label)
            previous = item.label


def run_align(
    config: AlignConfig,
    source: Source,
    out_dir: str | os.PathLike,
    sink_kind: str = "dir",
    manifest_path: str | os.PathLike | None = None,
    workers: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 256,
    overwrite: bool = False,
    progress: bool = True,
) -> AlignSummary:
    """Align every item of ``source`` into ``out_dir`` with the local engine (``workers``: processes; None = one per
    core on CPU; 0 = this process); resumable."""
    from facepipe.engine.local import run_job

    with AlignJob(config, source, out_dir, sink_kind, manifest_path, chunk_size, batch_size, overwrite) as job:
        return run_job(job, "local", workers=workers, progress=progress)
