"""``facepipe embed PHOTOS --detect``: raw photos to embeddings in one streaming pass.

Each batch of photos is decoded, detected (``facepipe.faces.detect_padded``, with the detector exactly as
``facepipe align`` builds it), reduced to the kept faces (``choose_faces``), warped to the embedder's input size
in memory (``estimate_norm`` + ``warp_crops``) and embedded: no crop is encoded, written or decoded again, so the
vectors are those of ``align --format png`` + ``embed``, and within JPEG noise of the default JPEG crops.

The run is the embed ``EmbedJob`` with one photo per input key: same store, same resume and growing inputs,
same manifest plus the detection columns (``source`` photo, ``box``, ``landmarks`` (5, 2) in the photo's pixels,
the score in ``det_score``). One row per kept face (``--keep all``: several, named ``<photo>#<i>``); a photo
without a face or that cannot be read keeps one row (``no_face`` / ``error``, zero vector).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from facepipe.alignment import estimate_norm, warp_crops
from facepipe.embedding.base import Embedder
from facepipe.embedding.store import (
    EmbedJob,
    EmbedSpec,
    EmbedSummary,
    EmbeddedBatch,
    build_embedder,
    detection_columns,
    embed_crops,
    results_table,
    run_settings,
)
from facepipe.faces import KEEP_MODES, choose_faces, detect_padded
from facepipe.pipeline.sources import Item, Source, open_source, reader_only
from facepipe.types import Face


@dataclass(frozen=True)
class DetectSpec:
    """What decides which faces a photo gives (recorded in ``run.json`` beside the ``EmbedSpec``)."""

    detector: str = "retinaface"
    detector_weights: str | None = None
    detector_options: dict[str, Any] = field(default_factory=dict)
    keep: str = "largest"
    min_score: float = 0.5
    pad_ratio: float = 0.0  # black border per side for detection (facepipe.faces), as a fraction of the longer side
    max_pixels: int = 50_000_000
    detect_max_side: int | None = 2560

    def __post_init__(self) -> None:
        if self.keep not in KEEP_MODES:
            raise ValueError(f"keep must be one of {', '.join(KEEP_MODES)}, got {self.keep!r}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError("min score must be within 0..1")
        if self.pad_ratio < 0:
            raise ValueError("pad ratio must be >= 0")

    def align_config(self, size: int | tuple[int, int], device: str) -> Any:
        """The align settings these correspond to (align's detector construction is reused as it is)."""
        from facepipe.pipeline.align import AlignConfig

        return AlignConfig(
            size=size, keep=self.keep, min_score=self.min_score, max_pixels=self.max_pixels,
            detect_max_side=self.detect_max_side, detector=self.detector, detector_weights=self.detector_weights,
            detector_options=dict(self.detector_options), device=device,
        )


class FaceEmbedder:
    """The ``--detect`` worker: photos in, one result row per kept face (``results_table`` with detection
    columns). Picklable: detector and embedder are built on first use, in the process that uses them."""

    def __init__(
        self, source: Source, detect: DetectSpec, spec: EmbedSpec, device: str = "cpu", batch_size: int = 64,
        threads: int | None = None, onnx_detector: str | None = None,
    ) -> None:
        self.source = source
        self.detect = detect
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.onnx_detector = onnx_detector  # RetinaFace exported once by the driver (align.exported_retinaface)
        self._embedder: Embedder | None = None
        self._detector: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_embedder"] = state["_detector"] = None  # rebuilt where it runs
        return state

    def for_device(self, device: str) -> "FaceEmbedder":
        onnx = self.onnx_detector if device == "cpu" else None
        return FaceEmbedder(self.source, self.detect, self.spec, device, self.batch_size, self.threads, onnx)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = build_embedder(self.spec, self.device, self.batch_size, self.threads)
        return self._embedder

    @property
    def crop_size(self) -> int | tuple[int, int]:
        height, width = getattr(getattr(self.embedder, "config", None), "input_size", None) or (112, 112)
        return height if height == width else (height, width)

    @property
    def detector(self) -> Any:
        if self._detector is None:
            from facepipe.pipeline.align import align_detector

            self._detector = align_detector(self.detect.align_config(self.crop_size, self.device), self.onnx_detector)
        return self._detector

    @property
    def embedding_size(self) -> int:
        return int(self.embedder.embedding_size)

    def prepare(self) -> None:
        _ = self.embedder, self.detector

    def __call__(self, batch: Sequence[Item]) -> pa.Table:
        """One batch; an unexpected failure is retried photo by photo so that only its photo becomes an error."""
        try:
            from facepipe.pipeline.align import decode_item  # align's own reading and bounded decoding

            return self._embed_photos(batch, [decode_item(self.source, item, self.detect.max_pixels) for item in batch])
        except Exception as exc:  # noqa: BLE001 - recorded in the manifest, the run goes on
            if len(batch) == 1:
                return self._rows([(batch[0].key, None, "error", f"processing failed: {type(exc).__name__}: {exc}")], [])
        return pa.concat_tables([self([item]) for item in batch])

    def _embed_photos(self, items: Sequence[Item], photos: Sequence[Any]) -> pa.Table:
        decoded = [photo.image for photo in photos if photo.image is not None]
        detections = iter(detect_padded(self.detector, decoded, self.detect.pad_ratio))  # in the photos' order
        rows: list[tuple[str, Face | None, str, str]] = []  # (photo key, face in photo pixels, status, reason)
        crops: list[np.ndarray] = []
        for item, photo in zip(items, photos):
            if photo.image is None:
                rows.append((item.key, None, "error", photo.error))
                continue
            faces = choose_faces(next(detections), photo.image.shape, self.detect.keep, self.detect.min_score)
            if not faces:
                rows.append((item.key, None, "no_face", "no face detected"))
                continue
            matrices = estimate_norm(np.stack([face.landmarks for face in faces]), self.crop_size)
            finite = np.isfinite(matrices).all(axis=(1, 2))  # coincident landmarks have no similarity transform
            if not finite.any():
                rows.append((item.key, None, "error", "degenerate landmarks (all points coincide): cannot align"))
                continue
            crops.extend(warp_crops(photo.image, matrices[finite], self.crop_size))
            sx, sy = photo.scale
            rows.extend((item.key, face.scaled(sx, sy), "ok", "") for face, ok in zip(faces, finite) if ok)
        return self._rows(rows, crops)

    def _rows(self, rows: list[tuple[str, Face | None, str, str]], crops: list[np.ndarray]) -> pa.Table:
        good = [i for i, (_, face, _, _) in enumerate(rows) if face is not None]
        embeddings, norms, sharpness = embed_crops(self.embedder, self.spec, crops, len(rows), good)
        face_number: dict[str, int] = {}
        paths = []
        for key, face, _, _ in rows:
            number = face_number[key] = face_number.get(key, -1) + 1
            paths.append(f"{key}#{number}" if self.detect.keep == "all" and face is not None else key)
        detection = detection_columns([key for key, _, _, _ in rows], [face for _, face, _, _ in rows])
        scores = [float("nan") if face is None else float(face.score) for _, face, _, _ in rows]
        batch = EmbeddedBatch(embeddings, norms, [r[2] for r in rows], [r[3] for r in rows], sharpness)
        return results_table(paths, batch, self.spec.dtype, det_scores=scores, detection=detection)


def embed_photos_job(
    photos: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: EmbedSpec,
    detect: DetectSpec,
    device: str = "cpu",
    batch_size: int = 8,
    shard_size: int = 50_000,
    threads: int | None = None,
    overwrite: bool = False,
) -> EmbedJob:
    """The started ``--detect`` run over every photo at ``photos`` (a folder tree, an image, a file list or a
    ``.rec``), for an engine to run: it resumes, and embeds only photos no finished shard holds."""
    from facepipe.pipeline.align import exported_retinaface

    source = open_source(photos)
    worker = FaceEmbedder(reader_only(source), detect, spec, device=device, threads=threads)
    if device == "cpu":  # workers load RetinaFace exported once, here (as align's do)
        scratch = Path(tempfile.gettempdir())  # where the export goes if the cache is read-only (this run only)
        worker.onnx_detector = exported_retinaface(detect.align_config(worker.crop_size, device), scratch, device)
    settings = {**run_settings(spec, photos), **{f"detect_{k}": v for k, v in asdict(detect).items()}}
    return EmbedJob(source, out_dir, worker, settings, shard_size, batch_size, overwrite, detection=True)


def embed_photos(
    photos: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: EmbedSpec,
    detect: DetectSpec,
    *,
    progress: bool = True,
    engine: str = "local",
    workers: int | None = 0,
    options: Any = None,
    **job_options: Any,
) -> EmbedSummary:
    """``embed_photos_job(photos, out_dir, spec, detect, **job_options)`` run to the end on an engine (see
    ``facepipe.engine.run_job``); a convenience for scripts and tests."""
    from facepipe.engine.local import run_job

    with embed_photos_job(photos, out_dir, spec, detect, **job_options) as job:
        return run_job(job, engine=engine, workers=workers, progress=progress, options=options)
