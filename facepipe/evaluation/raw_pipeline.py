"""Detect -> align -> embed for the images of a verification protocol, with an on-disk feature cache.

For every image (a file, or an entry of an already aligned .bin set):

1. detect all faces (batched, ``Detector`` protocol), optionally on the image with a black border (``pad``,
   see ``align_batch``);
2. choose one face: among faces with score >= ``min_score`` (0.5), the one with the largest
   ``area - 2 * squared distance of the box centre from the image centre`` (insightface ``FaceAnalysis``'s rule
   for keeping the main face: big and central wins). CFP / LFW images show one main face, possibly with
   background faces;
3. align it to the 112x112 ArcFace template from its five landmarks (Umeyama similarity);
4. embed the crop and its mirror separately (raw, un-normalised), so both the plain and the flip-test accuracy
   and insightface's XNorm can be computed.

**Fallback** when no face passes ``min_score``: the rule of insightface's alignment scripts for its .bin files:
the box inside a 6.25 % border of the image, widened by 22 px on each side (clipped), resized to 112x112.
For images that are already aligned crops (``.bin`` re-alignment) the fallback is the crop itself. Fallbacks are
counted and reported, never silent.

**Cache**: one ``.npz`` per (detector, detector weights hash, model, model weights hash, selection settings) in
``cache_dir``, holding per image key (the absolute image path, or ``<bin path>#<index>``) the two embeddings,
whether it was a fallback, and the chosen face. Reruns and ``compare-detectors`` only compute what is missing.
The file is rewritten atomically every ``save_every`` images, so an interrupted run keeps its work.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from facepipe.alignment.similarity import align_faces
from facepipe.detection.base import Detector
from facepipe.embedding.base import Embedder
from facepipe.types import Face

PIPELINE_VERSION = 1  # bump when the meaning of cached features changes
STATUS_FALLBACK = 0
STATUS_DETECTED = 1


def choose_face(faces: Sequence[Face], image_shape: tuple[int, ...], min_score: float = 0.5) -> Face | None:
    """The main face (see module docstring), or ``None`` when no face reaches ``min_score``."""
    candidates = [f for f in faces if f.score >= min_score]
    if not candidates:
        return None
    centre_x, centre_y = image_shape[1] / 2.0, image_shape[0] / 2.0

    def value(face: Face) -> float:
        cx, cy = face.center
        return face.area - 2.0 * ((cx - centre_x) ** 2 + (cy - centre_y) ** 2)

    return max(candidates, key=value)


def center_crop_fallback(image: np.ndarray, size: int = 112, border: float = 0.0625, margin: int = 44) -> np.ndarray:
    """insightface's no-detection crop: the box inside a ``border`` fraction, widened by ``margin / 2`` px."""
    height, width = image.shape[:2]
    x1, y1 = int(width * border), int(height * border)
    x2, y2 = width - x1, height - y1
    half = margin / 2.0
    x1, y1 = int(max(x1 - half, 0)), int(max(y1 - half, 0))
    x2, y2 = int(min(x2 + half, width)), int(min(y2 + half, height))
    return cv2.resize(image[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)


def resize_fallback(image: np.ndarray, size: int = 112) -> np.ndarray:
    """For images that already are aligned crops: the image itself (resized if needed)."""
    if image.shape[:2] == (size, size):
        return image.copy()
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def weights_fingerprint(weights: str | os.PathLike | None) -> str:
    """Hash of a weights file; for ``None`` (bundled defaults) a hash of the bundled weights folder."""
    if weights is not None:
        return file_sha256(weights)
    from facepipe.weights import WEIGHTS_DIR

    digest = hashlib.sha256(b"bundled")
    for path in sorted(WEIGHTS_DIR.iterdir()):
        if path.is_file() and not path.name.endswith(".py"):
            digest.update(path.name.encode() + file_sha256(path).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that determines an image's features (and therefore the cache file)."""

    detector: str
    detector_weights: str | None
    model: str
    weights: str | None
    min_score: float = 0.5
    size: int = 112
    mode: str = "raw"  # "raw": photos, centre-crop fallback; "aligned": .bin crops, crop fallback
    pad: float = 0.0  # black border added before detection, as a fraction of the image's longer side

    def cache_id(self) -> str:
        identity = {
            "version": PIPELINE_VERSION,
            "detector": self.detector,
            "detector_weights": weights_fingerprint(self.detector_weights),
            "model": self.model,
            "weights": weights_fingerprint(self.weights),
            "min_score": self.min_score,
            "size": self.size,
            "mode": self.mode,
            "pad": self.pad,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.detector}-{self.model}-{digest}"


@dataclass
class ImageFeatures:
    """Per-image results, rows in the order of ``keys``."""

    keys: list[str]
    embedding: np.ndarray  # (N, D) float32, raw embedding of the aligned crop
    embedding_flip: np.ndarray  # (N, D) float32, raw embedding of its mirror image
    status: np.ndarray  # (N,) int8: STATUS_DETECTED or STATUS_FALLBACK
    faces: np.ndarray  # (N, 15) float32 reference rows of the chosen face; NaN for fallbacks

    @property
    def n_fallback(self) -> int:
        return int(np.count_nonzero(self.status == STATUS_FALLBACK))

    def index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}

    def take(self, keys: Sequence[str]) -> "ImageFeatures":
        position = self.index()
        rows = np.array([position[k] for k in keys], dtype=np.int64)
        return ImageFeatures(list(keys), self.embedding[rows], self.embedding_flip[rows], self.status[rows], self.faces[rows])

    @staticmethod
    def concatenate(parts: Sequence["ImageFeatures"], dim: int) -> "ImageFeatures":
        if not parts:
            empty = np.zeros((0, dim), dtype=np.float32)
            return ImageFeatures([], empty, empty.copy(), np.zeros(0, np.int8), np.zeros((0, 15), np.float32))
        return ImageFeatures(
            [k for p in parts for k in p.keys],
            np.concatenate([p.embedding for p in parts]),
            np.concatenate([p.embedding_flip for p in parts]),
            np.concatenate([p.status for p in parts]),
            np.concatenate([p.faces for p in parts]),
        )


class FeatureCache:
    """``<cache_dir>/<spec.cache_id()>.npz`` with the features of every image computed so far."""

    def __init__(self, cache_dir: str | os.PathLike, spec: PipelineSpec) -> None:
        self.path = Path(cache_dir) / f"{spec.cache_id()}.npz"
        self.features: ImageFeatures | None = None
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    self.features = ImageFeatures(
                        [str(k) for k in data["keys"]],
                        data["embedding"],
                        data["embedding_flip"],
                        data["status"],
                        data["faces"],
                    )
            except (OSError, KeyError, ValueError):
                self.features = None  # unreadable cache (e.g. killed during a copy): recompute

    def lookup(self, keys: Sequence[str]) -> tuple[ImageFeatures | None, list[str]]:
        """(features of the cached keys, keys still to compute)."""
        if self.features is None:
            return None, list(keys)
        known = self.features.index()
        cached = [k for k in keys if k in known]
        missing = [k for k in keys if k not in known]
        return (self.features.take(cached) if cached else None), missing

    def add(self, new: ImageFeatures) -> None:
        if not new.keys:
            return
        if self.features is None:
            self.features = new
        else:
            self.features = ImageFeatures.concatenate([self.features, new], new.embedding.shape[1])

    def save(self) -> None:
        if self.features is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".npz", dir=self.path.parent)
        os.close(fd)
        try:
            np.savez(
                tmp,
                keys=np.array(self.features.keys, dtype=str),
                embedding=self.features.embedding,
                embedding_flip=self.features.embedding_flip,
                status=self.features.status,
                faces=self.features.faces,
            )
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _pad(image: np.ndarray, pad: int) -> np.ndarray:
    return cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0)) if pad else image


def align_batch(
    images: Sequence[np.ndarray],
    detector: Detector,
    min_score: float = 0.5,
    size: int = 112,
    mode: str = "raw",
    pad: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detect, choose the main face and align it, or fall back (see module docstring).

    Returns ``(crops (N, size, size, 3) uint8 BGR, status (N,) int8, faces (N, 15) float32 with NaN rows for
    fallbacks)``, faces in the given images' coordinates.

    ``pad`` adds a black border of ``pad * longer side`` pixels before detection. Faces that fill the frame
    are hard to detect (insightface #801), and MTCNN as facenet-pytorch implements it stretches the part of a
    box that lies inside the image to the network input instead of zero-padding it, which misplaces the
    landmarks of faces whose box crosses the border (measured on CFP: eyes tens of pixels off). Aligned .bin
    crops need it most (``pad=0.5``).
    """
    if mode not in ("raw", "aligned"):
        raise ValueError(f"unknown mode {mode!r}; use 'raw' or 'aligned'")
    if pad < 0:
        raise ValueError("pad must be >= 0")
    pads = [int(round(pad * max(im.shape[:2]))) for im in images]
    inputs = [_pad(im, border) for im, border in zip(images, pads)]
    detections = detector.detect(inputs)
    if len(detections) != len(inputs):
        raise RuntimeError(f"detector returned {len(detections)} results for {len(inputs)} images")
    chosen = [choose_face(faces, im.shape, min_score) for faces, im in zip(detections, inputs)]
    aligned = align_faces(inputs, [[f] if f is not None else [] for f in chosen], size)
    crops = np.empty((len(images), size, size, 3), dtype=np.uint8)
    status = np.empty(len(images), dtype=np.int8)
    faces = np.full((len(images), 15), np.nan, dtype=np.float32)
    for i, (image, face, crop, border) in enumerate(zip(images, chosen, aligned, pads)):
        if face is None:
            crops[i] = center_crop_fallback(image, size) if mode == "raw" else resize_fallback(image, size)
            status[i] = STATUS_FALLBACK
        else:
            crops[i] = crop[0]
            status[i] = STATUS_DETECTED
            faces[i] = face.translated(-border, -border).to_row()
    return crops, status, faces


def process_batch(
    images: Sequence[np.ndarray],
    detector: Detector,
    embedder: Embedder,
    min_score: float = 0.5,
    size: int = 112,
    mode: str = "raw",
    pad: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``align_batch`` then embed crops and mirrors: ``(embedding, embedding_flip, status, faces)``."""
    crops, status, faces = align_batch(images, detector, min_score, size, mode, pad)
    both = embedder.embed(np.concatenate([crops, crops[:, :, ::-1]]), flip=False)
    return both[: len(images)], both[len(images) :], status, faces


def _load_batches(keys: Sequence[str], load_image: Callable[[str], np.ndarray], batch_size: int):
    """Yield ``(batch keys, images)``; the next batch is decoded in a thread while the caller works on this one."""
    batches = [list(keys[i : i + batch_size]) for i in range(0, len(keys), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(lambda b: [load_image(k) for k in b], batches[0])
        for index, batch in enumerate(batches):
            images = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(lambda b: [load_image(k) for k in b], batches[index + 1])
            yield batch, images


def extract_features(
    keys: Sequence[str],
    load_image: Callable[[str], np.ndarray],
    detector: Detector,
    embedder: Embedder,
    spec: PipelineSpec,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    save_every: int = 1024,
    progress: bool = True,
    description: str = "features",
) -> ImageFeatures:
    """Features for ``keys`` (in that order), computing only what the cache lacks."""
    keys = list(dict.fromkeys(keys))
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cache = FeatureCache(cache_dir, spec) if cache_dir is not None else None
    missing = keys
    if cache is not None:
        _, missing = cache.lookup(keys)
    parts: list[ImageFeatures] = []
    if missing:
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc=description, unit="img", disable=not progress)
        unsaved: list[ImageFeatures] = []
        try:
            for batch_keys, images in _load_batches(missing, load_image, batch_size):
                emb, emb_flip, status, faces = process_batch(
                    images, detector, embedder, spec.min_score, spec.size, spec.mode, spec.pad
                )
                part = ImageFeatures(batch_keys, emb.astype(np.float32), emb_flip.astype(np.float32), status, faces)
                parts.append(part)
                unsaved.append(part)
                if cache is not None and sum(len(p.keys) for p in unsaved) >= save_every:
                    cache.add(ImageFeatures.concatenate(unsaved, embedder.embedding_size))
                    cache.save()
                    unsaved = []
                bar.update(len(batch_keys))
        finally:
            bar.close()
            if cache is not None and unsaved:
                cache.add(ImageFeatures.concatenate(unsaved, embedder.embedding_size))
                cache.save()
    if cache is not None and cache.features is not None:
        return cache.features.take(keys)
    return ImageFeatures.concatenate(parts, embedder.embedding_size).take(keys)


def feature_summary(features: ImageFeatures) -> dict[str, Any]:
    return {
        "images": len(features.keys),
        "detected": int(np.count_nonzero(features.status == STATUS_DETECTED)),
        "fallback": features.n_fallback,
        "fallback_keys": [k for k, s in zip(features.keys, features.status) if s == STATUS_FALLBACK][:50],
    }
