"""IJB-C / IJB-B image features: the extractor, its content-keyed cache, and the batch job that fills the cache.

Each image is aligned from its five points (or from the re-detected face nearest them) and embedded with and
without its mirror; the cache keeps both raw embeddings (``(n, 2, D)``), the face score and a flag per image, so
the protocol's N/D/F switches (``facepipe.evaluation.ijbc``) are re-evaluated from it in seconds.

**Cache.** A ``facepipe.io.run_state.RunState``: ``manifest.json`` holds the settings (the key below, the image
count, the shard size); shard ``k`` (images ``k*shard_size ..``) is three files ``features_k.npy`` (n, 2, D)
float32, ``scores_k.npy`` (n,) float32, ``flags_k.npy`` (n,) uint8, each written atomically, then the part
marker ``parts/shard-k.parquet``: a shard is done when its marker and its files are there, so a killed run resumes
at the first missing shard. The **key is content**: a digest of the image names, landmarks and faceness as read
(an edited landmarks file is a new cache, not stale features), the weights' content fingerprints, detector and
crop settings (``FeatureExtractor.cache_key``).

**Job.** ``IJBFeatureJob`` implements ``facepipe.engine.job.BatchJob``: units are the missing shards, batches
``batch_size`` images described by their paths, points and scores; results cross engines as Arrow tables
(``result_schema``). The command picks the engine (``facepipe.engine.local.run_job``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from facepipe.alignment import estimate_norm, warp_crops
from facepipe.engine.job import Unit
from facepipe.evaluation.ijbc_layout import IJBLayout
from facepipe.faces import detect_padded
from facepipe.io.atomic import atomic_path
from facepipe.io.digest import digest_json, digest_strings, weights_fingerprint
from facepipe.io.images import ImageDecodeError, read_image
from facepipe.io.run_state import RunState, RunStateError

GIVEN_LANDMARKS = "given"  # "detector" name for the five points shipped with the data set

# Per-image flags stored in the cache.
FLAG_OK = 0
FLAG_DETECTOR_FALLBACK = 1  # re-detection found no matching face: aligned from the given points
FLAG_UNREADABLE = 2  # image could not be decoded: zero feature, contributes nothing to its template
FLAG_FAILED = 3  # the engine gave up on the image's batch (its worker kept dying): zero feature

CACHE_VERSION = 2  # 2: content-keyed, RunState layout


class FeatureCacheError(ValueError):
    """The cache folder holds features made with other settings, or a damaged shard."""


# ------------------------------------------------------------------------------------ feature cache
class FeatureCache:
    """Sharded on-disk cache of [orig, flip] image embeddings, face scores and flags, in layout order (see the
    module docstring). Opening checks the settings; a job holds the run lock while it writes shards."""

    def __init__(self, directory: str | Path, key: dict[str, Any], num_images: int, shard_size: int = 4096) -> None:
        self.directory = Path(directory)
        self.key = key
        self.num_images = int(num_images)
        self.state = RunState(self.directory / "manifest.json", self.directory / "parts", prefix="shard")
        previous = None
        try:
            previous = self.state.previous_settings()
            self.shard_size = int(previous["shard_size"]) if previous and "shard_size" in previous else int(shard_size)
            settings = {"key": key, "num_images": self.num_images, "shard_size": self.shard_size}
            self.state.start(settings)
        except RunStateError as error:
            other = previous is not None and previous != json.loads(json.dumps(settings, default=str))
            raise FeatureCacheError(f"feature cache {self.directory} {'was made for other features: ' if other else ''}{error}") from None
        finally:
            self.state.close()  # reading needs no lock; ``lock`` takes it for writing

    def lock(self) -> None:
        try:
            self.state.acquire_lock()
        except RunStateError as error:
            raise FeatureCacheError(str(error)) from None

    def close(self) -> None:
        self.state.close()

    @property
    def num_shards(self) -> int:
        return (self.num_images + self.shard_size - 1) // self.shard_size

    def shard_range(self, index: int) -> tuple[int, int]:
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def _paths(self, index: int) -> tuple[Path, Path, Path]:
        return tuple(self.directory / f"{kind}_{index:06d}.npy" for kind in ("features", "scores", "flags"))  # type: ignore[return-value]

    def missing_shards(self) -> list[int]:
        committed = set(self.state.done_parts())
        return [k for k in range(self.num_shards) if k not in committed or not all(p.is_file() for p in self._paths(k))]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def write_shard(self, index: int, features: np.ndarray, scores: np.ndarray, flags: np.ndarray) -> None:
        """The shard's three files (each atomically), then its marker."""
        start, stop = self.shard_range(index)
        n = stop - start
        if features.shape[:2] != (n, 2) or scores.shape != (n,) or flags.shape != (n,):
            raise ValueError(f"shard {index} must hold {n} images: features (n,2,D), scores (n,), flags (n,)")
        arrays = (features.astype(np.float32), scores.astype(np.float32), flags.astype(np.uint8))
        for path, array in zip(self._paths(index), arrays):
            with atomic_path(path) as tmp:
                np.save(tmp, array)
        self.state.commit_part(index, pa.table({"image": pa.array(np.arange(start, stop), pa.int64())}))

    def read_shard(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features, scores, flags = (np.load(p) for p in self._paths(index))
        start, stop = self.shard_range(index)
        if len(features) != stop - start or len(scores) != stop - start or len(flags) != stop - start:
            raise FeatureCacheError(f"feature cache shard {index} in {self.directory} is corrupt; delete it to re-extract")
        return features, scores, flags

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        missing = self.missing_shards()
        if missing:
            raise FeatureCacheError(f"feature cache {self.directory} is incomplete: {len(missing)} of {self.num_shards} shards missing")
        for k in range(self.num_shards):
            features, scores, flags = self.read_shard(k)
            yield self.shard_range(k)[0], features, scores, flags

    def flags(self) -> np.ndarray:
        return np.concatenate([np.load(self._paths(k)[2]) for k in range(self.num_shards)])


# ------------------------------------------------------------------------------- feature extraction
def match_detection(faces: Sequence[Any], given: np.ndarray, max_distance: float = 0.5) -> Any | None:
    """The detected face whose five points are nearest the given ones (mean distance relative to the given
    points' extent), or None when even the nearest is further than ``max_distance`` (another face)."""
    if not faces:
        return None
    scale = max(float(np.ptp(given[:, 0])), float(np.ptp(given[:, 1])), 1.0)
    distances = [float(np.linalg.norm(face.landmarks - given, axis=1).mean()) / scale for face in faces]
    best = int(np.argmin(distances))
    return faces[best] if distances[best] <= max_distance else None


def extract_batch(
    paths: Sequence[str],
    landmarks: np.ndarray,
    faceness: np.ndarray,
    embedder: Any,
    detector: Any | None = None,
    crop_size: int = 112,
    detector_pad: float = 0.2,
) -> dict[str, np.ndarray]:
    """Features for one batch of loose crops: ``{"features": (n,2,D), "score": (n,), "flag": (n,)}``.

    Aligns from the given points, or from the matching face of ``detector`` (its score replaces the given
    faceness; no match -> given points, flagged). Unreadable images get zero features and a flag.
    Detection runs on each crop inside a black border of ``detector_pad`` x its longer side
    (``facepipe.faces.detect_padded``): faces that fill the crop otherwise get boxes beyond the image, and MTCNN
    then misplaces the landmarks (measured on CFP: median landmark error 18% of the face size without the
    border, 5% with 0.2).
    """
    n = len(paths)
    landmarks = np.asarray(landmarks, dtype=np.float32).reshape(n, 5, 2).copy()
    scores = np.asarray(faceness, dtype=np.float32).copy()
    flags = np.zeros(n, dtype=np.uint8)
    images: list[np.ndarray | None] = []
    for i, path in enumerate(paths):
        try:
            images.append(read_image(path))
        except (ImageDecodeError, OSError) as error:
            warnings.warn(f"IJB image {path} unreadable ({error}); it gets a zero feature")
            images.append(None)
            flags[i] = FLAG_UNREADABLE
    readable = [i for i, image in enumerate(images) if image is not None]
    if detector is not None and readable:
        detections = detect_padded(detector, [images[i] for i in readable], detector_pad)
        for i, faces in zip(readable, detections):
            face = match_detection(faces, landmarks[i])
            if face is None:
                flags[i] = FLAG_DETECTOR_FALLBACK
            else:
                landmarks[i] = face.landmarks
                scores[i] = face.score
    features = np.zeros((n, 2, int(embedder.embedding_size)), dtype=np.float32)
    if readable:
        matrices = estimate_norm(landmarks[readable], crop_size)
        crops = np.concatenate([warp_crops(images[i], m[None], crop_size) for i, m in zip(readable, matrices)])
        features[readable, 0], features[readable, 1] = embedder.embed_pair(crops)
    return {"features": features, "score": scores, "flag": flags}


@dataclass
class FeatureExtractor:
    """Picklable batch function (models are built lazily in the process that runs it).

    ``extractor({"path": (n,) str, "landmarks": (n,5,2), "faceness": (n,)})`` -> the batch plus ``features``,
    ``score``, ``flag`` (see :func:`extract_batch`).
    """

    model: str = "mobilefacenet"
    weights: str | None = None
    detector: str | None = None  # None: align from the given points
    detector_weights: str | None = None
    device: str = "cpu"
    crop_size: int = 112
    detector_pad: float = 0.2  # black border, fraction of the longer side, around each crop before detection
    precision: str = "fp32"  # the embedder's (facepipe.runtime); part of the cache key
    options: dict[str, Any] = field(default_factory=dict)  # more embedder settings (ONNX preset, backend); in the key when given
    _models: tuple[Any, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def models(self) -> tuple[Any, Any]:
        if self._models is None:
            from facepipe.embedding.base import create_embedder

            options = dict(self.options) if self.precision == "fp32" else {**self.options, "precision": self.precision}
            embedder = create_embedder(self.model, weights=self.weights, device=self.device, **options)
            detector = None
            if self.detector is not None:
                from facepipe.detection.base import create_detector

                detector = create_detector(self.detector, weights=self.detector_weights, device=self.device)
            self._models = (embedder, detector)
        return self._models

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_models"] = None
        return state

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        embedder, detector = self.models()
        out = extract_batch(list(batch["path"]), batch["landmarks"], batch["faceness"], embedder, detector, self.crop_size, self.detector_pad)
        return {**batch, **out}

    def embedding_size(self) -> int:
        return int(self.models()[0].embedding_size)

    def cache_key(self, layout: IJBLayout) -> dict[str, Any]:
        """What the features depend on, by content (see the module docstring)."""
        detector = self.detector or GIVEN_LANDMARKS
        return {
            "version": CACHE_VERSION,
            "dataset": str(layout.root.resolve()),
            "target": layout.target,
            "num_images": layout.num_images,
            "images": digest_strings(str(name) for name in layout.image_names),
            "landmarks": digest_strings([np.ascontiguousarray(layout.landmarks, "<f4").tobytes().hex(), np.ascontiguousarray(layout.faceness, "<f4").tobytes().hex()]),
            "model": self.model if self.precision == "fp32" else f"{self.model}@{self.precision}",
            "weights": weights_fingerprint(self.weights),
            "detector": detector,
            "detector_weights": None if self.detector is None else weights_fingerprint(self.detector_weights),
            "crop_size": self.crop_size,
            "detector_pad": self.detector_pad if self.detector else None,
            **({"options": dict(sorted(self.options.items()))} if self.options else {}),
        }


def cache_folder(cache_root: str | os.PathLike, target: str, model: str, detector: str, key: dict[str, Any]) -> Path:
    """Where the features of one (target, model, detector) and content key live under ``cache_root``."""
    return Path(cache_root) / f"{target}_{model}_{detector}_{digest_json(key)[:10]}"


# ------------------------------------------------------------------------------------------ the job
def result_schema(embedding_size: int) -> pa.Schema:
    """The job's result columns: image index, [orig, flip] features flattened (2 x D), score, flag."""
    return pa.schema(
        [
            ("image", pa.int64()),
            ("features", pa.list_(pa.float32(), 2 * embedding_size)),
            ("score", pa.float32()),
            ("flag", pa.uint8()),
        ]
    )


def _result_table(start: int, features: np.ndarray, scores: np.ndarray, flags: np.ndarray) -> pa.Table:
    n, _, dim = features.shape
    flat = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), pa.float32()), 2 * dim)
    return pa.Table.from_arrays(
        [pa.array(np.arange(start, start + n), pa.int64()), flat, pa.array(scores, pa.float32()), pa.array(flags, pa.uint8())],
        schema=result_schema(dim),
    )


@dataclass
class IJBFeatureWorker:
    """The job's picklable worker: the extractor on one batch descriptor, as an Arrow table."""

    extractor: FeatureExtractor

    def prepare(self) -> None:
        self.extractor.models()

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        out = self.extractor(batch)
        return _result_table(int(batch["start"]), out["features"], out["score"], out["flag"])


@dataclass
class IJBFeatureJob:
    """Fill the missing shards of ``cache`` with ``extractor``'s features (a ``BatchJob``; see the module docstring).

    ``finish`` returns the cache; ``extracted`` / ``reused`` count the images computed now and found cached."""

    layout: IJBLayout
    cache: FeatureCache
    extractor: FeatureExtractor
    batch_size: int = 64
    extracted: int = 0
    reused: int = 0

    @property
    def name(self) -> str:
        return f"{self.layout.target} features"

    @property
    def device(self) -> str:
        return self.extractor.device

    def pending(self) -> list[Unit]:
        if self.batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.cache.lock()
        units = []
        for shard in self.cache.missing_shards():
            start, stop = self.cache.shard_range(shard)
            batches = tuple(self._batch(s, min(s + self.batch_size, stop)) for s in range(start, stop, self.batch_size))
            units.append(Unit(shard, batches, stop - start))
        self.extracted = sum(unit.items for unit in units)
        self.reused = self.cache.num_images - self.extracted
        return units

    def _batch(self, start: int, stop: int) -> dict[str, Any]:
        return {
            "start": start,
            "path": np.array(self.layout.image_paths(start, stop), dtype=object),
            "landmarks": self.layout.landmarks[start:stop],
            "faceness": self.layout.faceness[start:stop],
        }

    def worker(self, device: str | None = None) -> IJBFeatureWorker:
        if device is None or device == self.extractor.device:
            return IJBFeatureWorker(self.extractor)
        return IJBFeatureWorker(replace(self.extractor, device=device))

    def failed(self, batch: dict[str, Any], reason: str) -> pa.Table:
        n = len(batch["path"])
        warnings.warn(f"{n} IJB images from {batch['path'][0]} failed ({reason}); they get zero features")
        features = np.zeros((n, 2, self.extractor.embedding_size()), np.float32)
        return _result_table(int(batch["start"]), features, np.asarray(batch["faceness"]), np.full(n, FLAG_FAILED, np.uint8))

    def commit(self, unit: Unit, results: Sequence[pa.Table]) -> None:
        table = pa.concat_tables(results).combine_chunks()
        start, stop = self.cache.shard_range(unit.id)
        images = table.column("image").to_numpy()
        if not np.array_equal(images, np.arange(start, stop)):
            raise RuntimeError(f"shard {unit.id}: the engine returned images {images[:3]}.. instead of {start}..{stop - 1}")
        values = table.column("features").combine_chunks().values.to_numpy(zero_copy_only=False)
        features = values.reshape(len(images), 2, -1)
        self.cache.write_shard(unit.id, features, table.column("score").to_numpy(), table.column("flag").to_numpy())

    def finish(self) -> FeatureCache:
        self.cache.close()
        return self.cache
