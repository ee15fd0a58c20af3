"""The streaming align job: read -> decode -> detect (batched) -> choose faces -> warp -> encode -> write.

The per-batch work is ``AlignWorker(config, source).process(items)``: a plain, picklable object that decodes,
detects, aligns and encodes a batch and returns one ``ItemResult`` (manifest row + encoded crops) per item.
``AlignRun`` holds the engine-independent part (fixed item order and chunks, what is left to do, naming,
sink, manifest parts). ``run_align`` is the local engine: a pool of worker processes (each with its own
detector and cores/workers threads, so nothing oversubscribes) fed a bounded number of batches, while the
main process commits chunk by chunk. A Ray engine maps ``AlignWorker.process`` over the pending chunks'
items and calls ``AlignRun.commit_chunk`` / ``AlignRun.finish``: same outputs, same manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import importlib.metadata
import importlib.util
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from facepipe.alignment import estimate_norm, warp_crops
from facepipe.io.images import ImageDecodeError, decode_image_bounded
from facepipe.pipeline.face_choice import KEEP_MODES, choose_faces
from facepipe.pipeline.manifest import ManifestRow, ManifestStore, status_counts
from facepipe.pipeline.sinks import colliding_stems, create_sink, identity_labels, output_names
from facepipe.pipeline.sources import Item, Source
from facepipe.types import Face

IMAGE_FORMATS = ("jpg", "png")


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


def pad_image(image: np.ndarray, pad_ratio: float) -> tuple[np.ndarray, int]:
    """Black border of ``pad_ratio * longest side`` around the image: tight crops (a face filling the frame)
    defeat anchor-based detectors, which never saw a face that large relative to the image."""
    pad = max(1, int(round(pad_ratio * max(image.shape[:2]))))
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0)), pad


def _resize_for_detection(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    longest = max(image.shape[:2])
    if max_side is None or longest <= max_side:
        return image, 1.0
    scale = max_side / longest
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


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


class AlignWorker:
    """Processes batches of items. Built from picklable parts; the detector is created on first use (in the
    process that uses it)."""

    def __init__(self, config: AlignConfig, source: Source, onnx_model: str | None = None) -> None:
        self.config = config
        self.source = source
        # The RetinaFace network already exported to ONNX (``exported_retinaface``), so that each worker
        # process loads it instead of exporting it again.
        self.onnx_model = onnx_model
        self._detector = None
        self._landmarks: dict[str, Face] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_detector"] = None
        state["_landmarks"] = None
        return state

    @property
    def detector(self):
        if self._detector is None:
            from facepipe.detection import create_detector, pipeline_detector_options

            options = pipeline_detector_options(self.config.detector, self.config.detector_options)
            if self.config.detector.startswith("retinaface"):
                # RetinaFace drops faces under its own threshold (0.5): let --min-score go lower than that.
                options.setdefault("threshold", self.config.min_score)
                options.setdefault("confidence_threshold", align_confidence_threshold(self.config.min_score, options))
            elif self.config.detector == "scrfd":  # SCRFD's det_thresh (0.5) would likewise floor --min-score
                options.setdefault("threshold", self.config.min_score)
            if self.onnx_model is not None:
                options["backend"] = "onnxruntime"
                self._detector = create_detector("retinaface-onnx", self.onnx_model, self.config.device, **options)
            else:
                self._detector = create_detector(self.config.detector, self.config.detector_weights, self.config.device, **options)
        return self._detector

    @property
    def landmarks(self) -> dict[str, Face]:
        if self._landmarks is None:
            from facepipe.pipeline.landmarks_file import read_landmarks_file

            self._landmarks = read_landmarks_file(self.config.landmarks_file)
        return self._landmarks

    def _decode(self, item: Item) -> tuple[np.ndarray | None, tuple[float, float], str]:
        try:
            data = self.source.read(item)
            image, scale = decode_image_bounded(data, self.config.max_pixels)
            return image, scale, ""
        except ImageDecodeError as exc:
            return None, (1.0, 1.0), str(exc)
        except (OSError, ValueError, KeyError) as exc:
            return None, (1.0, 1.0), f"cannot read: {exc}"

    def _detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        if not images:
            return []
        resized = [_resize_for_detection(image, self.config.detect_max_side) for image in images]
        detections = self.detector.detect([image for image, _ in resized])
        return [
            faces if scale == 1.0 else [face.scaled(1.0 / scale) for face in faces]
            for faces, (_, scale) in zip(detections, resized)
        ]

    def process(self, items: Sequence[Item]) -> list[ItemResult]:
        """One result per item, in order. An unexpected failure inside a batch is retried item by item so that
        only the item that causes it becomes an ``error`` row."""
        try:
            return self._process_batch(items)
        except Exception as exc:  # noqa: BLE001 - recorded in the manifest, the run goes on
            if len(items) == 1:
                return [self._failed(items[0], exc)]
        results = []
        for item in items:
            try:
                results.extend(self._process_batch([item]))
            except Exception as exc:  # noqa: BLE001
                results.append(self._failed(item, exc))
        return results

    @staticmethod
    def _failed(item: Item, exc: Exception) -> ItemResult:
        reason = f"processing failed: {type(exc).__name__}: {exc}"
        return ItemResult(ManifestRow(item.index, item.key, item.source, "error", reason), [])

    def prepare(self) -> None:
        """Load the detector or the landmarks file now, so that bad weights or files fail before any work."""
        if self.config.landmarks_file is not None:
            _ = self.landmarks
        else:
            _ = self.detector

    def _process_batch(self, items: Sequence[Item]) -> list[ItemResult]:
        cfg = self.config
        decoded = [self._decode(item) for item in items]
        rows = [ManifestRow(item.index, item.key, item.source, "error", reason) for item, (_, _, reason) in zip(items, decoded)]
        good = [i for i, (image, _, _) in enumerate(decoded) if image is not None]
        for i in good:
            image, (sx, sy) = decoded[i][0], decoded[i][1]
            rows[i].width, rows[i].height = round(image.shape[1] * sx), round(image.shape[0] * sy)
            rows[i].decode_scale = float(max(sx, sy))

        faces: dict[int, list[Face]] = {}
        if cfg.landmarks_file is not None:
            for i in good:
                face = self.landmarks.get(items[i].key)
                faces[i] = [] if face is None else [face.scaled(1 / decoded[i][1][0], 1 / decoded[i][1][1])]
                rows[i].num_detected = len(faces[i])
        else:
            for i, found in zip(good, self._detect([decoded[i][0] for i in good])):
                faces[i] = choose_faces(found, decoded[i][0].shape, cfg.keep, cfg.min_score)
                rows[i].num_detected = sum(face.score >= cfg.min_score for face in found)
            if cfg.retry_padded:
                retry = [i for i in good if not faces[i]]
                padded = [pad_image(decoded[i][0], cfg.pad_ratio) for i in retry]
                for i, (image, pad), found in zip(retry, padded, self._detect([image for image, _ in padded])):
                    found = [face.translated(-pad, -pad) for face in found]
                    faces[i] = choose_faces(found, decoded[i][0].shape, cfg.keep, cfg.min_score)
                    rows[i].num_detected = sum(face.score >= cfg.min_score for face in found)
                    rows[i].padded_retry = True

        results = []
        for i, item in enumerate(items):
            if i not in faces:
                results.append(ItemResult(rows[i], []))
                continue
            kept = faces[i]
            row = rows[i]
            if not kept:
                row.status = "no_face"
                row.reason = "not in landmarks file" if cfg.landmarks_file is not None else "no face detected"
                results.append(ItemResult(row, []))
                continue
            image, (sx, sy) = decoded[i][0], decoded[i][1]
            matrices = estimate_norm(np.stack([face.landmarks for face in kept]), cfg.size)
            finite = np.isfinite(matrices).all(axis=(1, 2))  # coincident landmarks have no similarity transform
            if not finite.any():
                row.reason = "degenerate landmarks (all points coincide): cannot align"
                results.append(ItemResult(row, []))
                continue
            kept = [face for face, ok in zip(kept, finite) if ok]
            crops = warp_crops(image, matrices[finite], cfg.size)
            row.status = "ok"
            for face in kept:
                original = face.scaled(sx, sy)
                row.boxes.append([float(v) for v in original.box])
                row.scores.append(float(face.score))
                row.landmarks.append([float(v) for v in original.landmarks.reshape(-1)])
            results.append(ItemResult(row, [encode_crop(crop, cfg.image_format, cfg.jpeg_quality) for crop in crops]))
        return results


# ---------------------------------------------------------------------------------------------------------
# Local engine


def exported_retinaface(config: AlignConfig, scratch: Path) -> str | None:
    """The ONNX file the workers load when each would otherwise export the network itself (``retinaface`` on
    CPU with the onnxruntime backend; None otherwise).

    Cached under ``<cache_dir>/onnx`` per (weights, torch version, network and export code), so later runs
    neither export nor import torch here; the first run exports it in this process while the forkserver
    boots. A read-only cache falls back to ``scratch`` (this run only). Same graph: same detections.
    """
    options = config.detector_options
    if config.detector != "retinaface" or config.device != "cpu" or config.landmarks_file is not None:
        return None
    if options.get("fp16") or options.get("backend", "auto") not in ("auto", "onnxruntime"):
        return None
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):
        return None  # auto runs torch; an explicit onnxruntime fails in the workers with its own message
    from facepipe.models.checkpoint import cache_dir, sha256_of
    from facepipe.weights import bundled

    weights = Path(config.detector_weights) if config.detector_weights is not None else bundled(BUNDLED_RETINAFACE)
    if weights.suffix.lower() == ".onnx":
        return None  # the workers load it directly
    key = hashlib.sha256()
    for part in (sha256_of(weights), importlib.metadata.version("torch"), importlib.metadata.version("onnx")):
        key.update(part.encode() + b"\0")
    for module in ("facepipe.models.retinaface", "facepipe.detection.backends"):
        # a change to the network or the export code gives a new file (read, not imported: no torch here)
        key.update(Path(importlib.util.find_spec(module).origin).read_bytes())
    path = cache_dir() / "onnx" / f"retinaface-mnet0.25-{key.hexdigest()[:20]}.onnx"
    if path.is_file():
        return str(path)
    from facepipe.detection.backends import export_onnx
    from facepipe.models.retinaface import retinaface_mnet025

    data = export_onnx(retinaface_mnet025(weights=weights))
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a unique temporary name: two runs may export at once, and each rename leaves one complete file
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".part", delete=False) as f:
            partial = f.name
            f.write(data)
        os.chmod(partial, 0o644)  # a cache other users' runs may read
        os.replace(partial, path)
    except OSError:  # read-only cache: this run only
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
        path = scratch / path.name
        path.write_bytes(data)
    return str(path)


BUNDLED_RETINAFACE = "retinaface_mobilenet0.25.pth"  # what retinaface_mnet025(pretrained=True) loads


_WORKER: AlignWorker | None = None
_SETUP_ERROR: BaseException | None = None


def _init_process(worker: AlignWorker, threads: int) -> None:
    """Per-process thread budget (torch, onnxruntime via torch's count, OpenMP, OpenCV: this worker's share of
    the cores), then the detector. A setup failure (bad weights) is kept and raised with the first batch, so
    the main process reports it instead of a bare broken pool."""
    global _WORKER, _SETUP_ERROR
    os.environ["OMP_NUM_THREADS"] = str(threads)
    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(threads)
    _WORKER = worker
    try:
        worker.prepare()
    except Exception as exc:  # noqa: BLE001 - re-raised in _process_in_pool
        _SETUP_ERROR = exc


def _process_in_pool(items: Sequence[Item]) -> list[ItemResult]:
    if _SETUP_ERROR is not None:
        raise _SETUP_ERROR
    assert _WORKER is not None, "worker process not initialised"
    return _WORKER.process(items)


def _worker_context() -> multiprocessing.context.BaseContext:
    # forkserver: workers fork from a clean server that imported torch once (no threads started, unlike this
    # process), so each worker starts in a fraction of a spawn's time without fork's OpenMP hazards.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "facepipe.detection", "facepipe.pipeline.align"])
        return context
    return multiprocessing.get_context("spawn")


@dataclass
class AlignSummary:
    counts: dict[str, int]
    processed: int
    skipped: int
    crops_written: int
    seconds: float
    manifest_path: Path

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def faces_not_kept(self) -> tuple[int, int]:
        """(faces above --min-score that --keep left out, images holding them), counted from the manifest."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.manifest_path, columns=["status", "num_detected", "outputs"]).to_pydict()
        left_out = [
            detected - len(outputs)
            for status, detected, outputs in zip(table["status"], table["num_detected"], table["outputs"])
            if status == "ok" and detected > len(outputs)
        ]
        return sum(left_out), len(left_out)

    def format(self) -> str:
        counts = ", ".join(f"{status} {n}" for status, n in self.counts.items())
        not_kept, images = self.faces_not_kept()
        return (
            f"{self.processed} images processed ({self.skipped} already done) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.2f} images/s; {counts}; {self.crops_written} crops written; "
            f"{not_kept} detected faces not kept (--keep) in {images} images; manifest {self.manifest_path}"
        )


def default_workers(device: str) -> int:
    # One process per core on CPU (RetinaFace-mnet scales worse over threads than over processes). On a GPU two
    # processes share the device, so one decodes / warps / encodes while the other runs the network.
    cores = max(1, os.cpu_count() or 1)
    return min(2, cores) if device.startswith("cuda") else cores


class AlignRun:
    """The engine-independent state of one align job over ``out_dir``: the items in a fixed order, their chunks,
    which chunks are still to do, the sink and the manifest store.

    An engine (the local pool below, or Ray) only has to run ``AlignWorker(config, source).process`` over the
    items of each pending chunk and hand the results to ``commit_chunk``; ``finish`` then completes the sink
    and merges the manifest. Same items + same settings -> same chunks, names, outputs and manifest.
    """

    def __init__(
        self,
        config: AlignConfig,
        source: Source,
        out_dir: str | os.PathLike,
        sink_kind: str = "dir",
        manifest_path: str | os.PathLike | None = None,
        chunk_size: int = 256,
        overwrite: bool = False,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk size must be at least 1")
        self.config, self.source, self.sink_kind = config, source, sink_kind
        self.out_dir = Path(out_dir)
        self.manifest_path = Path(manifest_path) if manifest_path is not None else self.out_dir / "manifest.parquet"
        items = source.items()
        self.labels = identity_labels(items)
        self.items = [replace(item, label=self.labels[item.identity]) if item.label < 0 else item for item in items]
        if sink_kind == "recordio":
            _check_grouped_by_identity(self.items)
        self.suffix_keys = colliding_stems(self.items)
        self.store = ManifestStore(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            **config.output_settings(),
            "sink": sink_kind,
            "chunk_size": chunk_size,
            "inputs": len(self.items),
            "inputs_digest": _digest(item.key for item in self.items),
        }
        self.store.start(settings, overwrite=overwrite)
        self.sink = create_sink(sink_kind, self.out_dir, self.store.staging_dir)
        self.chunks = [self.items[i : i + chunk_size] for i in range(0, len(self.items), chunk_size)]
        done = self.store.done_chunks()
        self.pending = [] if self.sink.done() else [c for c in range(len(self.chunks)) if c not in done]
        self.skipped = len(self.items) - sum(len(self.chunks[c]) for c in self.pending)
        self.crops_written = 0

    def commit_chunk(self, chunk_id: int, results: Sequence[ItemResult]) -> None:
        """Name the chunk's crops, have the sink write them, then commit its manifest part (outputs first, so a
        committed part implies its outputs)."""
        chunk = self.chunks[chunk_id]
        first_index = chunk[0].index
        ordered = sorted(results, key=lambda r: r.row.index)
        if [r.row.index for r in ordered] != [item.index for item in chunk]:
            raise ValueError(f"chunk {chunk_id}: results do not cover exactly the chunk's items")
        entries = []
        for result in ordered:
            item = chunk[result.row.index - first_index]
            keep_all = self.config.keep == "all"
            names = output_names(item, len(result.crops), keep_all, self.config.image_format, item.key in self.suffix_keys)
            result.row.outputs = names
            entries.extend((item, name, data) for name, data in zip(names, result.crops))
        self.sink.write_chunk(chunk_id, entries)
        self.store.commit_chunk(chunk_id, [r.row for r in ordered])
        self.crops_written += len(entries)

    def finish(self) -> dict[str, int]:
        """Complete the sink (e.g. merge RecordIO shards), write the manifest; returns counts per status."""
        self.sink.finish(self.labels)
        table = self.store.merge(self.manifest_path)
        return status_counts(table.column("status").to_pylist())


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
    """Align every item of ``source`` into ``out_dir`` with the local engine; resumable (finished chunks are
    skipped). ``workers=0`` runs in this process."""
    started = time.perf_counter()
    workers = default_workers(config.device) if workers is None else workers
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    run = AlignRun(config, source, out_dir, sink_kind, manifest_path, chunk_size, overwrite)
    worker = AlignWorker(config, source)
    if config.landmarks_file is not None or workers == 0:
        worker.prepare()  # fail before any work; worker processes prepare (and report failures) themselves
    if run.pending:
        _run_chunks(run, worker, workers, batch_size, progress)
    counts = run.finish()
    processed = len(run.items) - run.skipped
    return AlignSummary(counts, processed, run.skipped, run.crops_written, time.perf_counter() - started, run.manifest_path)


class _ChunkCollector:
    """Gathers batch results per chunk and commits a chunk when its last batch arrives."""

    def __init__(self, run: AlignRun, batches: list[tuple[int, list[Item]]], bar: Any) -> None:
        self.run, self.bar = run, bar
        self.remaining: dict[int, int] = {}
        for chunk_id, _ in batches:
            self.remaining[chunk_id] = self.remaining.get(chunk_id, 0) + 1
        self.results: dict[int, list[ItemResult]] = {chunk_id: [] for chunk_id in self.remaining}

    def add(self, chunk_id: int, batch_results: list[ItemResult]) -> bool:
        """Returns True when this completed (and committed) the chunk."""
        self.results[chunk_id].extend(batch_results)
        self.bar.update(len(batch_results))
        self.remaining[chunk_id] -= 1
        if self.remaining[chunk_id]:
            return False
        self.run.commit_chunk(chunk_id, self.results.pop(chunk_id))
        return True


def _run_chunks(run: AlignRun, worker: AlignWorker, workers: int, batch_size: int, progress: bool) -> None:
    from tqdm import tqdm

    batches = [
        (chunk_id, run.chunks[chunk_id][start : start + batch_size])
        for chunk_id in run.pending
        for start in range(0, len(run.chunks[chunk_id]), batch_size)
    ]
    bar = tqdm(total=sum(len(run.chunks[c]) for c in run.pending), unit="img", disable=not progress, dynamic_ncols=True)
    collector = _ChunkCollector(run, batches, bar)
    try:
        if workers == 0:
            for chunk_id, batch in batches:
                collector.add(chunk_id, worker.process(batch))
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            context = _worker_context()
            if context.get_start_method() == "forkserver":
                # Boot the server (it imports torch, ~1 s) while this process finds or exports the network.
                import multiprocessing.forkserver

                multiprocessing.forkserver.ensure_running()
            with tempfile.TemporaryDirectory(prefix="facepipe-align-") as scratch:
                try:
                    onnx_model = exported_retinaface(worker.config, Path(scratch))
                except Exception:  # noqa: BLE001 - e.g. bad weights: the workers build the detector and report it
                    onnx_model = None
                if onnx_model is not None:
                    worker = AlignWorker(worker.config, worker.source, onnx_model)
                with cf.ProcessPoolExecutor(
                    workers, mp_context=context, initializer=_init_process, initargs=(worker, threads)
                ) as pool:
                    _pump(pool, batches, run.pending, workers, collector)
    finally:
        bar.close()


def _pump(pool: cf.Executor, batches: list[tuple[int, list[Item]]], pending: list[int], workers: int, collector: _ChunkCollector) -> None:
    """Keep at most 2 batches per worker in flight, and only from the two oldest unfinished chunks, so that
    memory stays bounded however slow one batch is."""
    max_in_flight = 2 * workers
    queue = list(reversed(batches))
    in_flight: dict[cf.Future, int] = {}
    open_chunks = list(pending)  # chunks not yet committed, in order
    while queue or in_flight:
        while queue and len(in_flight) < max_in_flight and queue[-1][0] in open_chunks[:2]:
            chunk_id, batch = queue.pop()
            in_flight[pool.submit(_process_in_pool, batch)] = chunk_id
        finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
        for future in sorted(finished, key=lambda f: in_flight[f]):
            chunk_id = in_flight.pop(future)
            if collector.add(chunk_id, future.result()):
                open_chunks.remove(chunk_id)


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
    return None


def _digest(keys: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()
