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

**Cache**: one ``.npz`` per (detector, detector weights' content, model, model weights' content, selection
settings) in ``cache_dir``, holding per image key (the absolute image path, or ``<bin path>#<index>``) the two
embeddings, whether it was a fallback, the chosen face, and the **content stamp** the features were computed
from: the sha256 of the image file (of the .bin file for its entries). An entry is reused only when the stamp
still matches, so a replaced image is computed again; how many were reused is reported (``feature_summary``).
Hashing every image is cheap next to detection: CFP's 7000 images (98 MB) hash in 0.17 s (AMD EPYC, warm page
cache), the same as reading 64 KB of each plus its size and mtime, so the stamp is the full content hash.
Reruns and ``compare-detectors`` only compute what is missing or changed. The file is rewritten atomically
every ``save_every`` images, so an interrupted run keeps its work.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from facepipe.alignment.similarity import align_faces
from facepipe.detection.base import Detector
from facepipe.embedding.base import Embedder
from facepipe.faces import choose_faces, detect_padded
from facepipe.io.atomic import atomic_path
from facepipe.io.digest import digest_json, file_fingerprint, weights_fingerprint
from facepipe.types import Face

PIPELINE_VERSION = 2  # bump when the meaning of cached features changes (2: content stamps, one pad rounding)
STATUS_FALLBACK = 0
STATUS_DETECTED = 1


def choose_face(faces: Sequence[Face], image_shape: tuple[int, ...], min_score: float = 0.5) -> Face | None:
    """The main face (``choose_faces(keep="insightface")``, see module docstring), or ``None`` when no face
    reaches ``min_score``."""
    chosen = choose_faces(faces, image_shape, keep="insightface", min_score=min_score)
    return chosen[0] if chosen else None


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
        return f"{self.detector}-{self.model}-{digest_json(identity)[:16]}"


@dataclass
class ImageFeatures:
    """Per-image results, rows in the order of ``keys``."""

    keys: list[str]
    embedding: np.ndarray  # (N, D) float32, raw embedding of the aligned crop
    embedding_flip: np.ndarray  # (N, D) float32, raw embedding of its mirror image
    status: np.ndarray  # (N,) int8: STATUS_DETECTED or STATUS_FALLBACK
    faces: np.ndarray  # (N, 15) float32 reference rows of the chosen face; NaN for fallbacks
    reused: int = 0  # how many of these rows ``extract_features`` took from the cache (not computed now)

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
    """``<cache_dir>/<spec.cache_id()>.npz`` with the features of every image computed so far, each with the
    content stamp of its source (see module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike, spec: PipelineSpec) -> None:
        self.path = Path(cache_dir) / f"{spec.cache_id()}.npz"
        self.features: ImageFeatures | None = None
        self.stamps: dict[str, str] = {}
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
                    self.stamps = dict(zip(self.features.keys, (str(s) for s in data["stamps"])))
            except (OSError, KeyError, ValueError):
                self.features, self.stamps = None, {}  # unreadable cache (e.g. killed during a copy): recompute

    def lookup(self, keys: Sequence[str], stamps: Sequence[str] | None = None) -> tuple[ImageFeatures | None, list[str]]:
        """(features of the keys cached with the same content stamp, keys still to compute); ``stamps``: the
        keys' current stamps (default: the sha256 of each key's file)."""
        if self.features is None:
            return None, list(keys)
        stamps = [file_fingerprint(k) for k in keys] if stamps is None else stamps
        cached = [k for k, stamp in zip(keys, stamps) if self.stamps.get(k) == stamp]
        fresh = set(cached)
        missing = [k for k in keys if k not in fresh]
        return (self.features.take(cached) if cached else None), missing

    def add(self, new: ImageFeatures, stamps: Sequence[str]) -> None:
        """Add (or replace: a key computed again from new content) the rows of ``new``."""
        if not new.keys:
            return
        self.stamps.update(zip(new.keys, stamps))
        if self.features is not None:
            replaced = set(new.keys)
            kept = [k for k in self.features.keys if k not in replaced]
            old = self.features.take(kept) if len(kept) != len(self.features.keys) else self.features
            new = ImageFeatures.concatenate([old, new], new.embedding.shape[1])
        self.features = new

    def save(self) -> None:
        if self.features is None:
            return
        with atomic_path(self.path) as tmp, open(tmp, "wb") as handle:
            np.savez(
                handle,
                keys=np.array(self.features.keys, dtype=str),
                embedding=self.features.embedding,
                embedding_flip=self.features.embedding_flip,
                status=self.features.status,
                faces=self.features.faces,
                stamps=np.array([self.stamps[k] for k in self.features.keys], dtype=str),
            )


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

    ``pad`` adds a black border of ``pad * longer side`` pixels before detection (``facepipe.faces.detect_padded``,
    its rounding rule); the face is chosen and aligned in the original image (the crop's border is black either
    way). Faces that fill the frame
    are hard to detect (insightface #801), and MTCNN as facenet-pytorch implements it stretches the part of a
    box that lies inside the image to the network input instead of zero-padding it, which misplaces the
    landmarks of faces whose box crosses the border (measured on CFP: eyes tens of pixels off). Aligned .bin
    crops need it most (``pad=0.5``).
    """
    if mode not in ("raw", "aligned"):
        raise ValueError(f"unknown mode {mode!r}; use 'raw' or 'aligned'")
    detections = detect_padded(detector, images, pad)
    chosen = [choose_face(faces, image.shape, min_score) for faces, image in zip(detections, images)]
    aligned = align_faces(images, [[f] if f is not None else [] for f in chosen], size)
    crops = np.empty((len(images), size, size, 3), dtype=np.uint8)
    status = np.empty(len(images), dtype=np.int8)
    faces = np.full((len(images), 15), np.nan, dtype=np.float32)
    for i, (image, face, crop) in enumerate(zip(images, chosen, aligned)):
        if face is None:
            crops[i] = center_crop_fallback(image, size) if mode == "raw" else resize_fallback(image, size)
            status[i] = STATUS_FALLBACK
        else:
            crops[i] = crop[0]
            status[i] = STATUS_DETECTED
            faces[i] = face.to_row()
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
    plain, mirrored = embedder.embed_pair(crops)
    return plain, mirrored, status, faces


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
    stamp: Callable[[str], str] = file_fingerprint,
) -> ImageFeatures:
    """Features for ``keys`` (in that order), computing only what the cache lacks or holds for other content.

    ``stamp(key)`` is the content stamp of a key's source (default: the sha256 of the file at ``key``);
    the result's ``reused`` counts the rows taken from the cache.
    """
    keys = list(dict.fromkeys(keys))
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    cache = FeatureCache(cache_dir, spec) if cache_dir is not None else None
    missing = keys
    stamps: dict[str, str] = {}
    if cache is not None:
        stamps = {key: stamp(key) for key in keys}
        _, missing = cache.lookup(keys, [stamps[k] for k in keys])
    parts: list[ImageFeatures] = []
    if missing:
        from tqdm import tqdm

        bar = tqdm(total=len(missing), desc=description, unit="img", disable=not progress)
        unsaved: list[ImageFeatures] = []

        def save() -> None:
            done = ImageFeatures.concatenate(unsaved, embedder.embedding_size)
            cache.add(done, [stamps[k] for k in done.keys])
            cache.save()
            unsaved.clear()

        try:
            for batch_keys, images in _load_batches(missing, load_image, batch_size):
                emb, emb_flip, status, faces = process_batch(
                    images, detector, embedder, spec.min_score, spec.size, spec.mode, spec.pad
                )
                part = ImageFeatures(batch_keys, emb.astype(np.float32), emb_flip.astype(np.float32), status, faces)
                parts.append(part)
                unsaved.append(part)
                if cache is not None and sum(len(p.keys) for p in unsaved) >= save_every:
                    save()
                bar.update(len(batch_keys))
        finally:
            bar.close()
            if cache is not None and unsaved:
                save()
    if cache is not None and cache.features is not None:
        result = cache.features.take(keys)
    else:
        result = ImageFeatures.concatenate(parts, embedder.embedding_size).take(keys)
    result.reused = len(keys) - len(missing)
    return result


def feature_summary(features: ImageFeatures) -> dict[str, Any]:
    return {
        "images": len(features.keys),
        "detected": int(np.count_nonzero(features.status == STATUS_DETECTED)),
        "fallback": features.n_fallback,
        "fallback_keys": [k for k, s in zip(features.keys, features.status) if s == STATUS_FALLBACK][:50],
        "reused": features.reused,
        "computed": len(features.keys) - features.reused,
    }
