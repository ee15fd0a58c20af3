"""WIDER FACE validation protocol: ground truth ``.mat`` files, prediction folders, easy/medium/hard AP.

The numbers follow the official evaluation (wondervictor/WiderFace-Evaluation, the same code as
Pytorch_Retinaface ``widerface_evaluate/evaluation.py``) step for step, so that an AP printed here can be
compared with published tables:

* prediction rows are ``x, y, w, h, score``; scores are min-max normalised once over every prediction of
  the evaluated images;
* IoU uses the ``+1`` pixel convention on ``x2 = x + w``, ``y2 = y + h``;
* each prediction, in file order, takes its best-IoU ground-truth face; with IoU >= 0.5 it either recalls
  that face (first time only) or, when the face is not part of the setting (e.g. a tiny face in ``easy``),
  the prediction is dropped from the proposals instead of counting as a false positive;
* 1000 score thresholds ``1 - (k + 1) / 1000``; precision = recalled / kept proposals, recall = recalled /
  number of setting faces; VOC all-point AP.

Evaluating a subset of the validation images (anything given in ``images=``) counts only that subset's
faces and normalises scores over that subset's predictions, which equals running the reference code with
its ``.mat`` lists filtered to the subset. The upstream ``rstrip('.jpg')`` name bug is not reproduced.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from facepipe.io.atomic import atomic_path, atomic_write_text
from facepipe.io.files import MiB, FileReadError, read_file_bounded, read_text_bounded
from facepipe.types import Face

SETTINGS = ("easy", "medium", "hard")
NUM_THRESHOLDS = 1000
IOU_THRESHOLD = 0.5
MAX_MAT_BYTES = 256 * MiB  # wider_face_val.mat is 400 KB
MAX_PREDICTION_BYTES = 64 * MiB  # one image's boxes


class WiderFormatError(ValueError):
    """A ground-truth or prediction file does not follow the WIDER FACE layout."""


@dataclass(frozen=True)
class WiderImage:
    """Ground truth of one validation image."""

    event: str  # e.g. "0--Parade"
    name: str  # file name without extension, e.g. "0_Parade_marchingband_1_465"
    boxes: np.ndarray  # (G, 4) float64 x, y, w, h
    counted: Mapping[str, np.ndarray]  # setting -> 0-based indices of the faces that setting counts

    @property
    def key(self) -> str:
        return f"{self.event}/{self.name}"


@dataclass(frozen=True)
class WiderGroundTruth:
    images: tuple[WiderImage, ...]  # in .mat order (events, then files)
    _by_key: dict[str, WiderImage] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {image.key: image for image in self.images})

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __getitem__(self, key: str) -> WiderImage:
        return self._by_key[key]

    @property
    def keys(self) -> list[str]:
        return [image.key for image in self.images]

    def subset(self, keys: Iterable[str]) -> "WiderGroundTruth":
        """The images named by ``keys`` (``"<event>/<name>"``), kept in .mat order."""
        wanted = set(keys)
        unknown = sorted(wanted - set(self._by_key))
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise WiderFormatError(f"{len(unknown)} image(s) are not in the WIDER ground truth: {shown}")
        return WiderGroundTruth(tuple(image for image in self.images if image.key in wanted))


@dataclass
class WiderResult:
    ap: dict[str, float]  # setting -> AP
    count_face: dict[str, int]  # setting -> number of faces counted
    num_images: int
    score_range: tuple[float, float]  # (min, max) used for normalisation
    precision: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # setting -> (1000,)
    recall: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **{s: _json_float(self.ap[s]) for s in SETTINGS},
            "images": self.num_images,
            "count_face": dict(self.count_face),
            "score_min_max": [float(v) for v in self.score_range],
        }

    def table(self) -> str:
        lines = [f"{'setting':<8}{'AP':>10}{'faces':>8}"]
        for s in SETTINGS:
            lines.append(f"{s:<8}{self.ap[s]:>10.4f}{self.count_face[s]:>8d}")
        lines.append(f"images: {self.num_images}")
        return "\n".join(lines)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _json_float(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


# --------------------------------------------------------------------------------------------- ground truth
def load_ground_truth(gt_dir: str | os.PathLike) -> WiderGroundTruth:
    """Read ``wider_face_val.mat`` and ``wider_{easy,medium,hard}_val.mat`` from ``gt_dir``."""
    from scipy.io import loadmat

    gt_dir = Path(gt_dir)
    paths = {"all": gt_dir / "wider_face_val.mat", **{s: gt_dir / f"wider_{s}_val.mat" for s in SETTINGS}}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise WiderFormatError(f"WIDER ground truth file(s) missing: {', '.join(missing)}")
    def read_mat(path: Path) -> dict:
        try:  # read through the bounded reader: a FIFO or device named .mat must not hang loadmat
            return loadmat(io.BytesIO(read_file_bounded(path, MAX_MAT_BYTES)))
        except Exception as exc:  # FileReadError, scipy's MatReadError, ValueError, OSError...: damaged file
            raise WiderFormatError(f"{path}: not a readable MATLAB file ({_reason(exc)})") from None

    face_mat = read_mat(paths["all"])
    setting_mats = {s: read_mat(paths[s]) for s in SETTINGS}
    images = []
    try:
        setting_lists = {s: setting_mats[s]["gt_list"] for s in SETTINGS}
        event_list, file_list, box_list = face_mat["event_list"], face_mat["file_list"], face_mat["face_bbx_list"]
        for e in range(len(event_list)):
            event = str(event_list[e][0][0])
            files, boxes = file_list[e][0], box_list[e][0]
            for j in range(len(files)):
                gt_boxes = np.asarray(boxes[j][0], dtype=np.float64).reshape(-1, 4)
                if not np.isfinite(gt_boxes).all():
                    raise ValueError(f"non-finite box in {event}/{files[j][0][0]}")
                counted = {}
                for s in SETTINGS:
                    one_based = np.asarray(setting_lists[s][e][0][j][0], dtype=np.int64).reshape(-1)
                    counted[s] = one_based - 1
                images.append(WiderImage(event, str(files[j][0][0]), gt_boxes, counted))
    except (KeyError, ValueError, IndexError, TypeError) as exc:  # a .mat of another layout
        raise WiderFormatError(f"{gt_dir}: not the WIDER FACE val ground truth ({_reason(exc)})") from None
    return WiderGroundTruth(tuple(images))


# ---------------------------------------------------------------------------------------------- predictions
def faces_to_rows(faces: Sequence[Face], truncate: bool = True, plus_one: bool = False) -> np.ndarray:
    """``(N, 5)`` float64 ``x, y, w, h, score`` exactly as the upstream ``test_widerface.py`` files read back.

    ``truncate=True`` reproduces the upstream writer: ``x = int(x1)``, ``w = int(x2) - int(x1)`` (truncation
    toward zero) and the score as ``str(float32)``. ``truncate=False`` keeps the float box. ``plus_one`` adds 1
    to widths and heights, as the writers of the detectors in :data:`PLUS_ONE_WRITERS` do.
    """
    if not faces:
        return np.zeros((0, 5), dtype=np.float64)
    boxes = np.stack([f.box for f in faces]).astype(np.float32)
    if truncate:
        boxes = np.trunc(boxes)
    rows = np.empty((len(faces), 5), dtype=np.float64)
    rows[:, 0:2] = boxes[:, 0:2]
    rows[:, 2:4] = boxes[:, 2:4].astype(np.float64) - boxes[:, 0:2].astype(np.float64) + (1.0 if plus_one else 0.0)
    # Parse the float32 score's shortest text, as the reference reader does, so that in-memory evaluation
    # equals evaluation of written files to the last bit.
    rows[:, 4] = [float(str(np.float32(f.score))) for f in faces]
    return rows


# Detectors whose published WIDER AP comes from a writer with w = x2 - x1 + 1, h = y2 - y1 + 1 (SCRFD's
# mmdet-based test script; insightface's SCRFD AP on the shared subset, wider_ap_scrfd_shared.json, is
# reproduced only this way). Pytorch_Retinaface's writer has no +1.
PLUS_ONE_WRITERS = frozenset({"scrfd"})


def _format_value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def write_prediction_file(path: str | os.PathLike, rows: np.ndarray) -> None:
    """One ``<name>.txt``: name line, count line, then ``x y w h score`` rows; written atomically."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    lines = [path.stem, str(len(rows))]
    lines += [" ".join(_format_value(v) for v in row) + " " for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_prediction_file(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """``(name, rows)`` of one prediction file; ``name`` has no directory and no image extension."""
    path = Path(path)
    try:
        text = read_text_bounded(path, MAX_PREDICTION_BYTES)
    except FileReadError as exc:
        raise WiderFormatError(f"{path}: {exc}") from None
    lines = text.splitlines()
    if len(lines) < 2:
        raise WiderFormatError(f"{path}: expected a name line and a count line")
    name = lines[0].strip().replace("\\", "/").split("/")[-1]
    for extension in (".jpg", ".jpeg", ".png"):
        if name.lower().endswith(extension):
            name = name[: -len(extension)]
    name = name or path.stem
    try:
        count = int(lines[1].strip())
    except ValueError:
        raise WiderFormatError(f"{path}: second line must be the number of boxes, got {lines[1]!r}") from None
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields[:5]]
        except ValueError:
            raise WiderFormatError(f"{path}:{number}: not numbers: {line!r}") from None
        if len(values) != 5:
            raise WiderFormatError(f"{path}:{number}: expected 'x y w h score', got {line!r}")
        if not all(math.isfinite(v) for v in values):
            raise WiderFormatError(f"{path}:{number}: NaN or infinite value: {line!r}")
        rows.append(values)
    if len(rows) != count:
        raise WiderFormatError(f"{path}: count line says {count} boxes but {len(rows)} rows follow (truncated file?)")
    return name, np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def write_predictions(directory: str | os.PathLike, predictions: Mapping[str, np.ndarray]) -> None:
    """Write ``{"<event>/<name>": rows}`` as ``directory/<event>/<name>.txt``."""
    directory = Path(directory)
    for key, rows in predictions.items():
        event, name = _split_key(key)
        write_prediction_file(directory / event / f"{name}.txt", rows)


def read_predictions(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every ``<event>/<name>.txt`` under ``directory`` as ``{"<event>/<name>": rows}``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WiderFormatError(f"prediction folder not found: {directory}")
    predictions = {}
    for event_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        for file in sorted(event_dir.glob("*.txt")):
            name, rows = read_prediction_file(file)
            predictions[f"{event_dir.name}/{name}"] = rows
    return predictions


def prediction_path(directory: str | os.PathLike, key: str) -> Path:
    event, name = _split_key(key)
    return Path(directory) / event / f"{name}.txt"


def _split_key(key: str) -> tuple[str, str]:
    parts = key.split("/")
    if len(parts) != 2 or not all(parts):
        raise WiderFormatError(f"WIDER image key must be '<event>/<name>', got {key!r}")
    return parts[0], parts[1]


# ----------------------------------------------------------------------------------------------- evaluation
def box_overlaps_plus_one(boxes: np.ndarray, query: np.ndarray) -> np.ndarray:
    """IoU ``(N, K)`` of xyxy boxes with the ``+1`` pixel convention of the reference Cython ``bbox_overlaps``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    query = np.asarray(query, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(boxes[:, None, 2], query[None, :, 2]) - np.maximum(boxes[:, None, 0], query[None, :, 0]) + 1
    ih = np.minimum(boxes[:, None, 3], query[None, :, 3]) - np.maximum(boxes[:, None, 1], query[None, :, 1]) + 1
    box_area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    query_area = (query[:, 2] - query[:, 0] + 1) * (query[:, 3] - query[:, 1] + 1)
    intersection = iw * ih
    union = box_area[:, None] + query_area[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        overlaps = np.where((iw > 0) & (ih > 0), intersection / union, 0.0)
    return overlaps


def _xywh_to_xyxy(rows: np.ndarray) -> np.ndarray:
    boxes = np.array(rows[:, :4], dtype=np.float64)
    boxes[:, 2] += boxes[:, 0]
    boxes[:, 3] += boxes[:, 1]
    return boxes


def _image_pr_info(
    scores: np.ndarray, best_gt: np.ndarray, matched: np.ndarray, counted_mask: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """``(T, 2)`` [kept proposals, recalled faces] of one image at each threshold (reference ``img_pr_info``)."""
    matched_counted = matched & counted_mask[best_gt]
    matched_uncounted = matched & ~counted_mask[best_gt]
    # A counted face is recalled by the first prediction (in file order) whose best match it is.
    first_recall = np.zeros(len(scores), dtype=bool)
    if matched_counted.any():
        candidates = np.flatnonzero(matched_counted)
        _, first = np.unique(best_gt[candidates], return_index=True)
        first_recall[candidates[first]] = True
    recalled_so_far = np.cumsum(first_recall)
    proposals_so_far = np.cumsum(~matched_uncounted)
    # Index of the last prediction (file order) whose score reaches each threshold.
    suffix_max = np.maximum.accumulate(scores[::-1])[::-1]
    reached = np.searchsorted(-suffix_max, -thresholds, side="right")
    info = np.zeros((len(thresholds), 2), dtype=np.float64)
    has = reached > 0
    last = reached[has] - 1
    info[has, 0] = proposals_so_far[last]
    info[has, 1] = recalled_so_far[last]
    return info


def _voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def normalize_scores(predictions: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """Global min-max score normalisation of the reference (its running min starts at 1 and max at 0)."""
    low, high = 1.0, 0.0
    for rows in predictions.values():
        if len(rows):
            low = min(low, float(np.min(rows[:, 4])))
            high = max(high, float(np.max(rows[:, 4])))
    normalized = {}
    for key, rows in predictions.items():
        rows = np.array(rows, dtype=np.float64).reshape(-1, 5)
        if len(rows):
            # The reference divides by zero when every score is equal (e.g. one prediction in all): keep
            # them all at every threshold instead of turning them into NaN.
            rows[:, 4] = (rows[:, 4] - low) / (high - low) if high > low else 1.0
        normalized[key] = rows
    return normalized, (low, high)


def evaluate(
    predictions: Mapping[str, np.ndarray],
    ground_truth: WiderGroundTruth,
    images: Iterable[str] | None = None,
    iou_threshold: float = IOU_THRESHOLD,
    num_thresholds: int = NUM_THRESHOLDS,
) -> WiderResult:
    """Easy / medium / hard AP of ``{"<event>/<name>": (N, 5) x, y, w, h, score}`` predictions.

    ``images`` (keys) selects the evaluated subset; by default the images that have a prediction entry. An
    evaluated image with no entry counts as having no detections (its faces still count).
    """
    keys = list(predictions) if images is None else list(images)
    subset = ground_truth.subset(keys)
    evaluated = {}
    for image in subset.images:
        rows = np.asarray(predictions.get(image.key, np.zeros((0, 5))), dtype=np.float64)
        if rows.size == 0:
            rows = rows.reshape(0, 5)
        if rows.ndim != 2 or rows.shape[1] != 5:
            raise WiderFormatError(f"predictions for {image.key} must be (N, 5) x, y, w, h, score; got {rows.shape}")
        evaluated[image.key] = rows
    normalized, score_range = normalize_scores(evaluated)
    thresholds = 1 - (np.arange(num_thresholds, dtype=np.float64) + 1) / num_thresholds

    pr_curves = {s: np.zeros((num_thresholds, 2), dtype=np.float64) for s in SETTINGS}
    count_face = {s: 0 for s in SETTINGS}
    for image in subset.images:
        rows = normalized[image.key]
        for s in SETTINGS:
            count_face[s] += len(image.counted[s])
        if len(image.boxes) == 0 or len(rows) == 0:
            continue
        overlaps = box_overlaps_plus_one(_xywh_to_xyxy(rows), _xywh_to_xyxy(image.boxes))
        best_gt = overlaps.argmax(axis=1)
        matched = overlaps[np.arange(len(rows)), best_gt] >= iou_threshold
        for s in SETTINGS:
            counted_mask = np.zeros(len(image.boxes), dtype=bool)
            counted_mask[image.counted[s]] = True
            pr_curves[s] += _image_pr_info(rows[:, 4], best_gt, matched, counted_mask, thresholds)

    result = WiderResult(ap={}, count_face=count_face, num_images=len(subset), score_range=score_range)
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in SETTINGS:
            precision = pr_curves[s][:, 1] / pr_curves[s][:, 0]
            recall = pr_curves[s][:, 1] / count_face[s] if count_face[s] else np.full(num_thresholds, np.nan)
            result.precision[s], result.recall[s] = precision, recall
            result.ap[s] = _voc_ap(recall, precision) if count_face[s] else float("nan")
    return result


def evaluate_folder(
    prediction_dir: str | os.PathLike, gt_dir: str | os.PathLike, images: Iterable[str] | None = None
) -> WiderResult:
    """Evaluate a ``<event>/<name>.txt`` prediction folder against the ``.mat`` files in ``gt_dir``."""
    return evaluate(read_predictions(prediction_dir), load_ground_truth(gt_dir), images=images)


def plot_pr_curves(result: WiderResult, path: str | os.PathLike, title: str = "WIDER FACE val") -> None:
    """Precision-recall curves of the three settings in one PNG, AP in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 4.5), dpi=120)
    for setting in SETTINGS:
        axes.plot(result.recall[setting], result.precision[setting], label=f"{setting}  AP {result.ap[setting]:.4f}")
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=f"{title} ({result.num_images} images)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    figure.tight_layout()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png")
    finally:
        plt.close(figure)


def image_key(path: str | os.PathLike) -> str:
    """``"<event>/<name>"`` of an image path laid out as ``.../<event>/<name>.jpg``."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}"
