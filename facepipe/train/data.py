"""Training data for RetinaFace: annotation readers and a seeded, worker-safe dataset.

Three annotation formats, each read into ``TrainSample(image_path, FaceTargets)``:

* ``label-txt`` -- WIDER FACE with RetinaFace landmarks (``retinaface_gt_v1.1/<split>/label.txt``): a
  ``# relative/path.jpg`` line, then one line per face ``x y w h  lx0 ly0 f0 ... lx4 ly4 f4  score``; a
  first landmark coordinate of -1 means the face has no landmarks. Lines with only ``x y w h`` (the val
  split) are faces without landmarks.
* ``jsonl`` -- one JSON object per line: ``{"path": "a.jpg", "faces": [{"box": [x1, y1, x2, y2],
  "landmarks": [[x, y] * 5]}, ...]}``; ``landmarks`` is optional (or null) per face. Paths are relative to
  ``--images`` (or absolute).
* ``wider-mat`` -- the official WIDER ground truth ``wider_face_{train,val}.mat`` (boxes only); images not
  present under ``--images`` are skipped, so a subset of the images can be used.

Faces with a non-positive width or height are dropped when reading (WIDER has a few).
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from facepipe.io.files import FileReadError, read_file_bounded, read_text_bounded
from facepipe.io.images import ImageDecodeError, decode_image, read_image_bytes
from facepipe.train.augment import FaceTargets

ANNOTATION_FORMATS = ("label-txt", "jsonl", "wider-mat")
Transform = Callable[[np.ndarray, FaceTargets, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class AnnotationError(ValueError):
    """An annotation file is malformed; the message names the file and line."""


@dataclass
class TrainSample:
    image_path: Path
    faces: FaceTargets


def _faces_from_lists(boxes: list, landmarks: list, has_landmarks: list) -> FaceTargets:
    faces = FaceTargets(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(landmarks, dtype=np.float32).reshape(-1, 5, 2),
        np.asarray(has_landmarks, dtype=bool),
    )
    size = faces.boxes[:, 2:] - faces.boxes[:, :2]
    return faces.subset((size > 0).all(axis=1))


MAX_ANNOTATION_BYTES = 1 << 30


def _annotation_lines(path: Path) -> list[str]:
    try:
        return read_text_bounded(path, MAX_ANNOTATION_BYTES).split("\n")  # file lines: only \n ends one
    except FileReadError as exc:
        raise AnnotationError(f"{path}: {exc}") from None


def read_label_txt(path: str | os.PathLike, images_root: str | os.PathLike) -> list[TrainSample]:
    path, images_root = Path(path), Path(images_root)
    samples: list[TrainSample] = []
    current: Path | None = None
    boxes: list = []
    landmarks: list = []
    has_landmarks: list = []

    def flush() -> None:
        if current is not None:
            samples.append(TrainSample(current, _faces_from_lists(boxes, landmarks, has_landmarks)))

    for line_number, raw in enumerate(_annotation_lines(path), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            flush()
            current = images_root / line[1:].strip()
            boxes, landmarks, has_landmarks = [], [], []
            continue
        if current is None:
            raise AnnotationError(f"{path}:{line_number}: face line before the first '# image' line")
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            raise AnnotationError(f"{path}:{line_number}: not a list of numbers: {line[:80]!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise AnnotationError(f"{path}:{line_number}: NaN or infinite value: {line[:80]!r}")
        if len(values) < 4:
            raise AnnotationError(f"{path}:{line_number}: expected 'x y w h [landmarks]', got {len(values)} values")
        x, y, w, h = values[:4]
        boxes.append([x, y, x + w, y + h])
        if len(values) >= 19 and values[4] >= 0:
            points = np.asarray(values[4:19], dtype=np.float32).reshape(5, 3)[:, :2]
            landmarks.append(points)
            has_landmarks.append(True)
        else:
            landmarks.append(np.zeros((5, 2), dtype=np.float32))
            has_landmarks.append(False)
    flush()
    return samples


def read_jsonl(path: str | os.PathLike, images_root: str | os.PathLike) -> list[TrainSample]:
    path, images_root = Path(path), Path(images_root)
    samples: list[TrainSample] = []
    for line_number, raw in enumerate(_annotation_lines(path), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            boxes, landmarks, has_landmarks = [], [], []
            for face in record.get("faces", []):
                box = [float(v) for v in face["box"]]
                if len(box) != 4:
                    raise ValueError(f"box needs 4 values x1 y1 x2 y2, got {len(box)}")
                boxes.append(box)
                points = face.get("landmarks")
                if points is None:
                    landmarks.append(np.zeros((5, 2), dtype=np.float32))
                    has_landmarks.append(False)
                else:
                    points = np.asarray(points, dtype=np.float32)
                    if points.size != 10:
                        raise ValueError(f"landmarks need 5 (x, y) points, got {points.size} values")
                    landmarks.append(points.reshape(5, 2))
                    has_landmarks.append(True)
            if not np.isfinite(np.asarray(boxes, dtype=np.float64)).all() or not all(
                np.isfinite(p).all() for p in landmarks
            ):
                raise ValueError("NaN or infinite coordinate")
            image_path = images_root / record["path"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AnnotationError(f"{path}:{line_number}: {exc}") from None
        samples.append(TrainSample(image_path, _faces_from_lists(boxes, landmarks, has_landmarks)))
    return samples


def write_jsonl(samples: Iterable[TrainSample], path: str | os.PathLike, images_root: str | os.PathLike) -> None:
    """Inverse of ``read_jsonl`` (paths written relative to ``images_root`` where possible)."""
    images_root = Path(images_root)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            try:
                rel = sample.image_path.relative_to(images_root)
            except ValueError:
                rel = sample.image_path
            faces = []
            for box, points, has in zip(sample.faces.boxes, sample.faces.landmarks, sample.faces.has_landmarks):
                face: dict = {"box": [float(v) for v in box]}
                face["landmarks"] = points.tolist() if has else None
                faces.append(face)
            f.write(json.dumps({"path": rel.as_posix(), "faces": faces}) + "\n")


def read_wider_mat(path: str | os.PathLike, images_root: str | os.PathLike) -> list[TrainSample]:
    images_root = Path(images_root)
    samples: list[TrainSample] = []
    for image_key, boxes_xywh in _wider_boxes(path):
        image_path = images_root / f"{image_key}.jpg"
        if not image_path.is_file():
            continue
        boxes = np.asarray(boxes_xywh, dtype=np.float32).reshape(-1, 4).copy()
        boxes[:, 2:] += boxes[:, :2]
        n = len(boxes)
        samples.append(TrainSample(image_path, _faces_from_lists(boxes, np.zeros((n, 5, 2)), np.zeros(n, bool))))
    return samples


def _wider_boxes(path: str | os.PathLike) -> Iterable[tuple[str, np.ndarray]]:
    """``(event/name, (N, 4) x y w h)`` for every image of a WIDER ``.mat`` ground-truth file.

    ``facepipe.evaluation.widerface.load_ground_truth`` needs the val easy/medium/hard files beside the
    main one; training also reads ``wider_face_train.mat``, which has none, hence this small reader.
    """
    from scipy.io import loadmat

    try:
        mat = loadmat(io.BytesIO(read_file_bounded(path, MAX_ANNOTATION_BYTES)))
    except Exception as exc:  # FileReadError, scipy's MatReadError, ValueError...: damaged file
        text = str(exc).strip()
        raise AnnotationError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {text.splitlines()[0] if text else ''})") from None
    if not all(k in mat for k in ("event_list", "file_list", "face_bbx_list")):
        raise AnnotationError(f"{path}: not a WIDER FACE ground-truth .mat (no event_list / file_list / face_bbx_list)")
    for event_index, event in enumerate(mat["event_list"].ravel()):
        event_name = str(np.ravel(event)[0])
        files = mat["file_list"].ravel()[event_index].ravel()
        boxes = mat["face_bbx_list"].ravel()[event_index].ravel()
        for name, image_boxes in zip(files, boxes):
            yield f"{event_name}/{np.ravel(name)[0]}", np.asarray(image_boxes, dtype=np.float32)


def read_annotations(fmt: str, path: str | os.PathLike, images_root: str | os.PathLike) -> list[TrainSample]:
    readers = {"label-txt": read_label_txt, "jsonl": read_jsonl, "wider-mat": read_wider_mat}
    if fmt not in readers:
        raise ValueError(f"unknown annotation format {fmt!r}; choose from {', '.join(ANNOTATION_FORMATS)}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    samples = readers[fmt](path, images_root)
    if not samples:
        raise AnnotationError(f"{path}: no images found (images root {images_root})")
    return samples


class FaceDetectionDataset(Dataset):
    """Decodes and transforms one sample per index.

    The random stream of sample ``i`` in epoch ``e`` is ``numpy.random.default_rng([seed, e, i])``, so an
    epoch's augmentations are the same whatever the number of DataLoader workers, and a resumed run sees
    exactly the batches the interrupted one would have seen. Call ``set_epoch`` before each epoch (with
    non-persistent workers, which re-pickle the dataset each epoch).
    """

    def __init__(self, samples: Sequence[TrainSample], transform: Transform, seed: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]
        try:
            image = decode_image(read_image_bytes(sample.image_path))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{sample.image_path}: {exc}") from None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tensor, rows = self.transform(image, sample.faces.copy(), rng)
        return torch.from_numpy(tensor), torch.from_numpy(rows)


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)
