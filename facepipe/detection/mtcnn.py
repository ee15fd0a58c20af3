"""MTCNN cascade with the exact semantics of facenet-pytorch 2.6.0 ``MTCNN.detect``, batched.

The cascade (all arithmetic float32, as in the reference):

1. Image pyramid: scales ``12/min_face_size * factor**k`` while the short side stays >= 12 px; each level
   is resized to ``int(h*s + 1) x int(w*s + 1)`` with *area* interpolation (= torch ``interpolate(mode="area")``,
   i.e. adaptive average pooling; computed here from an integral image, bit-identical and reusable for the
   crops). P-Net proposes 12x12 cells (stride 2) with probability >= ``thresholds[0]``; NMS 0.5 per level,
   NMS 0.7 per image, box regression (offsets times width/height without +1), squared.
2. R-Net on 24x24 area-resized crops (crop rows ``trunc(y1)-1 .. trunc(y2)`` clamped to the image; with
   ``edge_padding="zero"`` not clamped but zero-padded, as the original MTCNN does - see ``crop_windows``);
   probability > ``thresholds[1]``; NMS 0.7; regression (offsets times width/height *with* +1); squared.
3. O-Net on 48x48 crops; probability > ``thresholds[2]``; landmarks from the O-Net input box
   (``x1 - 1 + (x2 - x1 + 1) * fraction``), then box regression, then the "Min" NMS (overlap divided by the
   smaller area, +1 areas, keep when <= 0.7).

NMS in stages 1-2 follows torchvision ``batched_nms``: IoU without +1, suppress when IoU > threshold, candidates
visited by score descending with ties in index order, and torchvision's CPU switch to a per-group loop plus
torch's (unstable) re-sort above 1000 boxes. Tie order matters: boxes whose truncated crops coincide get
identical R/O-Net scores, and the tie decides which survives. Each image is processed on its own numbers, so
results for an image do not depend on what else is in the batch (apart from oneDNN rounding a convolution over
several images differently, ~1e-7 relative; the reference runs one NMS over all images
of a batch, which can change its batched results; its single-image calls are the parity target). R-Net and
O-Net run in chunks of 512 crops, as the reference does.

Batching: images of the same size are processed together (``batch_size`` at a time): P-Net runs on a pyramid
level of several images at once while the level is small (``pnet_pixels_per_pass``), R-Net and O-Net run on
the crops of all of them together. Images of different sizes are grouped by size. The small levels of an image
(under ``PACK_BELOW_PIXELS``) are packed side by side into one image and share a P-Net pass; masking each
level's border in the first convolution's output keeps its cells as they are alone (see ``_packing``).

Threads: the groups of one ``detect`` call are independent, so on CPU they run on ``workers`` threads (default:
torch's intra-op thread count), each with one intra-op thread; a call with one group spreads its pyramid levels
over the threads instead (levels are independent until the per-image NMS that joins them). MTCNN's convolutions are too small (3 to 64
channels) for torch to split one of them well over several cores, while whole images split perfectly; torch's
kernels and most of the numpy work release the GIL. Results do not depend on ``workers``.

Output order: ``order="score"`` (default, the ``Detector`` protocol) sorts by probability descending;
``order="area"`` reproduces facenet-pytorch's ``select_largest=True`` order (box area descending), which the
parity tests use.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import cv2
import numpy as np
import torch

from facepipe.models.checkpoint import CheckpointError, load_state_dict_strict, read_state_dict
from facepipe.models.mtcnn import DEFAULT_WEIGHTS, ONet, PNet, RNet, checkpoint_filter, normalize_rgb
from facepipe.types import Face
from facepipe.weights import bundled

Order = Literal["score", "area"]
EdgePadding = Literal["stretch", "zero"]
PNET_CELL = 12
PNET_STRIDE = 2
RNET_SIZE = 24
ONET_SIZE = 48
INT32_SAFE_PIXELS = (2**31 - 1) // 255  # up to this many pixels a uint8 channel sums below 2**31


# ----------------------------------------------------------------------------------------------- input


def to_rgb(image: np.ndarray) -> np.ndarray:
    """BGR / BGRA / grey uint8 image -> contiguous RGB ``(H, W, 3)`` uint8 (the networks' colour order)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W, 3) BGR image, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=2))
    return np.ascontiguousarray(image[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped


# ------------------------------------------------------------------------------------- area resizing


class IntegralImage:
    """Summed-area table of an RGB uint8 image for exact area (adaptive average pooling) resizing.

    Window sums of integer pixels are exact (int32 while the whole image sums below 2**31, float64 beyond), and
    they are divided as ``float32(sum) / rows / cols`` - the same roundings torch's adaptive average pooling
    makes - so the pixels are bit-identical to ``interpolate(mode="area")`` as long as torch's float32 running
    sum is exact too (window sums below 2**24, i.e. windows up to 65,793 pixels: pyramid levels of images up
    to ~3000 px on the short side; beyond, torch rounds its running sum and we do not, a ~1e-7 relative
    difference). One table serves the whole pyramid and the R-Net and O-Net crops.
    """

    def __init__(self, rgb: np.ndarray) -> None:
        self.height, self.width = rgb.shape[:2]
        exact_in_int32 = self.height * self.width <= INT32_SAFE_PIXELS
        self.table = cv2.integral(rgb, sdepth=cv2.CV_32S if exact_in_int32 else cv2.CV_64F)

    def resize(self, out_height: int, out_width: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """The whole image area-resized to ``(out_height, out_width, 3)`` float32, or its ``rows`` x ``cols`` part."""
        y0, y1 = (w[0][rows] for w in _windows(np.zeros(1, np.int64), np.array([self.height]), out_height))
        x0, x1 = (w[0][cols] for w in _windows(np.zeros(1, np.int64), np.array([self.width]), out_width))
        if y0.size == 0 or x0.size == 0:
            return np.zeros((y0.size, x0.size, 3), np.float32)
        # Separable gathers: rows first (contiguous copies of the columns the windows touch), then columns of the
        # smaller result.
        first = int(x0[0])
        table = self.table[:, first:int(x1[-1]) + 1]
        row_sums = table[y1] - table[y0]
        # np.take keeps the (rows, cols, 3) memory order; ``row_sums[:, x1]`` would be laid out column-major, and
        # oneDNN convolutions on such strides are slow, and slower still on their first call for a shape (measured:
        # 28 ms instead of 6 ms for P-Net on a 232x256 level).
        sums = np.take(row_sums, x1 - first, axis=1) - np.take(row_sums, x0 - first, axis=1)
        return _average(sums, (y1 - y0)[:, None, None], (x1 - x0)[:, None])

    def content_box(self) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` span of the rows and columns holding a non-black pixel (all 0 if none)."""
        last_column, last_row = self.table[:, -1].sum(axis=1), self.table[-1].sum(axis=1)
        rows = np.flatnonzero(np.diff(last_column) != 0)  # pixels are >= 0: a row sums to 0 only when black
        cols = np.flatnonzero(np.diff(last_row) != 0)
        if rows.size == 0:
            return 0, 0, 0, 0
        return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1

    def crops(self, top: np.ndarray, bottom: np.ndarray, left: np.ndarray, right: np.ndarray, size: int) -> np.ndarray:
        """Rows ``top:bottom``, columns ``left:right`` of each box, area-resized to ``(K, size, size, 3)`` float32.

        Spans may reach outside the image: the part outside counts as black (zero) pixels. Clipping each
        pooling window to the image and still dividing by its full size is exactly zero padding.
        """
        y0, y1 = _windows(top, bottom, size)
        x0, x1 = _windows(left, right, size)
        rows, cols = y1 - y0, x1 - x0
        if top.min(initial=0) < 0 or bottom.max(initial=0) > self.height:
            y0, y1 = np.clip(y0, 0, self.height), np.clip(y1, 0, self.height)
        if left.min(initial=0) < 0 or right.max(initial=0) > self.width:
            x0, x1 = np.clip(x0, 0, self.width), np.clip(x1, 0, self.width)
        flat = self.table.reshape(-1, 3)
        stride = self.width + 1

        def corner(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
            # np.take along axis 0 is several times faster than the equivalent fancy index here.
            return np.take(flat, (rows * stride)[:, :, None] + cols[:, None, :], axis=0)

        sums = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
        return _average(sums, rows[:, :, None, None], cols[:, None, :, None])


def _average(sums: np.ndarray, window_rows: np.ndarray, window_cols: np.ndarray) -> np.ndarray:
    """Window sums -> means, dividing by rows then columns in float32 like torch's adaptive average pooling.

    ``window_rows`` / ``window_cols`` are window heights / widths already shaped to broadcast against ``sums``.
    """
    return sums.astype(np.float32) / window_rows.astype(np.float32) / window_cols.astype(np.float32)


def _windows(start: np.ndarray, stop: np.ndarray, out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-pooling windows: output ``i`` of a span of ``n`` averages ``[floor(i*n/out), ceil((i+1)*n/out))``."""
    n = (stop - start).astype(np.int64)[:, None]
    i = np.arange(out, dtype=np.int64)[None, :]
    return start[:, None] + (i * n) // out, start[:, None] + ((i + 1) * n + out - 1) // out


# ------------------------------------------------------------------------------------------------ NMS


def _overlapping_pairs(boxes: np.ndarray, plus_one: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(a, b)``, ``a != b``, that can have a non-zero intersection (a sweep along x, then y).

    Every other pair has intersection 0 exactly. Boxes with a zero, negative or non-finite area are paired
    with everything, since 0 / 0 overlaps are NaN and the NMS variants treat NaN differently.
    """
    one = np.float32(plus_one)
    by_x = np.argsort(boxes[:, 0], kind="stable")
    x1, x2 = boxes[by_x, 0], boxes[by_x, 2]
    # Sorted by x1, a box can only meet the boxes that start before it ends.
    ends = np.searchsorted(x1, x2 + one, side="left")
    starts = np.arange(len(boxes)) + 1
    counts = np.maximum(ends - starts, 0)
    first = np.repeat(np.arange(len(boxes)), counts)
    second = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + first + 1
    pairs_a, pairs_b = by_x[first], by_x[second]
    y1, y2 = np.ascontiguousarray(boxes[:, 1]), np.ascontiguousarray(boxes[:, 3])
    # The same float32 expression as the intersection height: pairs dropped here intersect in exactly 0.
    meets_in_y = np.minimum(y2[pairs_a], y2[pairs_b]) - np.maximum(y1[pairs_a], y1[pairs_b]) + one > 0
    pairs_a, pairs_b = pairs_a[meets_in_y], pairs_b[meets_in_y]
    areas = (boxes[:, 2] - boxes[:, 0] + one) * (boxes[:, 3] - boxes[:, 1] + one)
    odd = np.flatnonzero(~(areas > 0))
    if odd.size:
        everyone = np.arange(len(boxes))
        extra_a = np.repeat(odd, len(boxes))
        extra_b = np.tile(everyone, odd.size)
        distinct = extra_a != extra_b
        pairs_a = np.concatenate([pairs_a, extra_a[distinct]])
        pairs_b = np.concatenate([pairs_b, extra_b[distinct]])
    return pairs_a, pairs_b


# Below this many boxes (most NMS calls of a cascade: median 12 on padded CFP) testing every pair is cheaper than
# finding the pairs that can meet.
_ALL_PAIRS_MAX_BOXES = 48


@functools.cache
def _all_pairs(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(earlier, later)`` position pair of ``count`` boxes, earlier first, by earlier then later."""
    earlier, later = np.triu_indices(count, 1)
    return earlier, later


def _greedy_suppression(boxes: np.ndarray, order: np.ndarray, plus_one: int, suppresses) -> np.ndarray:
    """Greedy NMS over ``order``: a box is kept unless an earlier kept box ``suppresses`` it.

    Exact and vectorised: ``suppresses(kept_boxes, later_boxes)`` is evaluated pair by pair, with the same float32
    arithmetic as the one-by-one loop, but only on pairs whose boxes can intersect (on every pair of a few boxes);
    the greedy pass then walks the (sparse) suppression edges in order.
    """
    ordered = boxes[order]
    if len(order) <= _ALL_PAIRS_MAX_BOXES:
        earlier, later = _all_pairs(len(order))
    else:
        a, b = _overlapping_pairs(ordered, plus_one)
        earlier, later = np.minimum(a, b), np.maximum(a, b)  # positions in the visiting order
    if earlier.size:
        columns = [np.ascontiguousarray(ordered[:, k]) for k in range(4)]  # 1-D takes are much faster than row gathers
        hit = suppresses([c[earlier] for c in columns], [c[later] for c in columns])
        earlier, later = earlier[hit], later[hit]
    alive = np.ones(len(order), dtype=bool)
    if earlier.size:
        by_source = np.argsort(earlier, kind="stable")
        earlier, later = earlier[by_source], later[by_source]
        sources, first_edge = np.unique(earlier, return_index=True)
        last_edge = np.append(first_edge[1:], len(earlier))
        for source, lo, hi in zip(sources.tolist(), first_edge.tolist(), last_edge.tolist()):
            if alive[source]:
                alive[later[lo:hi]] = False
    return order[alive]


def _intersections(a: Sequence[np.ndarray], b: Sequence[np.ndarray], plus_one: int) -> tuple[np.ndarray, ...]:
    """Intersection areas of the box pairs ``(a[k], b[k])`` and the areas of ``a`` and of ``b``, float32.

    ``a`` and ``b`` are the coordinate columns ``(x1, y1, x2, y2)``; ``plus_one`` selects the pixel-inclusive
    convention (width = x2 - x1 + 1) of the MATLAB-era code.
    """
    one = np.float32(plus_one)
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a, b
    w = np.maximum(np.float32(0), np.minimum(ax2, bx2) - np.maximum(ax1, bx1) + one)
    h = np.maximum(np.float32(0), np.minimum(ay2, by2) - np.maximum(ay1, by1) + one)
    return w * h, (ax2 - ax1 + one) * (ay2 - ay1 + one), (bx2 - bx1 + one) * (by2 - by1 + one)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS with torchvision semantics: float32 IoU without +1, suppress when IoU > threshold.

    Candidates are visited by score descending, ties in index order; returns kept indices in that order.
    """

    def suppresses(kept: list[np.ndarray], later: list[np.ndarray]) -> np.ndarray:
        inter, area_kept, area_later = _intersections(kept, later, plus_one=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = inter / (area_kept + area_later - inter)
        # torchvision compares the float32 IoU in double; NaN (degenerate boxes) never suppresses.
        return iou.astype(np.float64) > threshold

    return _greedy_suppression(boxes, np.argsort(-scores, kind="stable"), 0, suppresses)


# torchvision's CPU batched_nms switches strategy above this many boxes (4000 coordinates); the strategies order
# score ties differently, and tie order decides which of two equal-score boxes survives later, so we follow it.
_TORCHVISION_OFFSET_TRICK_MAX_BOXES = 1000


def batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float) -> np.ndarray:
    """NMS within each group, kept indices by score descending, exactly as torchvision ``batched_nms`` on CPU.

    Up to 1000 boxes torchvision shifts each group by ``group * (max coordinate + 1)`` (float32) and runs one NMS,
    so ties stay in index order. Above that it runs NMS per group and re-sorts the survivors with torch's
    default (not stable) descending sort; we call the same sort so equal scores come out in the same order.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(boxes) <= _TORCHVISION_OFFSET_TRICK_MAX_BOXES:
        offsets = groups.astype(np.float32) * (boxes.max() + np.float32(1))
        return nms(boxes + offsets[:, None], scores, threshold)
    kept_mask = np.zeros(len(boxes), dtype=bool)
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        kept_mask[members[nms(boxes[members], scores[members], threshold)]] = True
    kept = np.flatnonzero(kept_mask)
    ranking = torch.sort(torch.from_numpy(scores[kept]), descending=True).indices.numpy()
    return kept[ranking]


def nms_min(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """facenet-pytorch's final "Min" NMS: overlap over the smaller (+1) area, keep when overlap <= threshold.

    Candidates are visited in reverse of numpy's default ascending argsort of the scores, as the reference
    takes them from its end, so that exact score ties resolve the same way.
    """
    limit = np.float32(threshold)

    def suppresses(kept: list[np.ndarray], later: list[np.ndarray]) -> np.ndarray:
        inter, area_kept, area_later = _intersections(kept, later, plus_one=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            overlap = inter / np.minimum(area_kept, area_later)
        return ~(overlap <= limit)  # NaN suppresses here, unlike torchvision

    return _greedy_suppression(boxes, np.argsort(scores)[::-1], 1, suppresses)


# -------------------------------------------------------------------------------------- box geometry


def square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square around its centre (side = longer side, no +1)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * np.float32(0.5) - side * np.float32(0.5)
    out[:, 1] = boxes[:, 1] + h * np.float32(0.5) - side * np.float32(0.5)
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def apply_regression(boxes: np.ndarray, offsets: np.ndarray, plus_one: bool) -> np.ndarray:
    """Shift box edges by ``offsets`` times the box width/height (R/O stages use the +1 size convention)."""
    one = np.float32(1 if plus_one else 0)
    w = boxes[:, 2] - boxes[:, 0] + one
    h = boxes[:, 3] - boxes[:, 1] + one
    out = boxes.copy()
    out[:, 0] = boxes[:, 0] + offsets[:, 0] * w
    out[:, 1] = boxes[:, 1] + offsets[:, 1] * h
    out[:, 2] = boxes[:, 2] + offsets[:, 2] * w
    out[:, 3] = boxes[:, 3] + offsets[:, 3] * h
    return out


def crop_windows(
    boxes: np.ndarray, width: int, height: int, edge_padding: EdgePadding = "stretch"
) -> tuple[np.ndarray, ...]:
    """1-based inclusive box edges truncated to ints -> 0-based spans ``top, bottom, left, right``, plus validity.

    ``"stretch"`` (facenet-pytorch) clamps the spans to the image, so the in-image part of a box that crosses
    the edge is stretched to the full network input and the face in it is distorted. ``"zero"`` (the original
    MTCNN's ``pad``: the crop is a box-sized black canvas with the in-image part pasted at its place) keeps the
    box span; ``IntegralImage.crops`` treats what lies outside as black. A box is valid when it overlaps the
    image.
    """
    edges = boxes[:, :4].astype(np.int32)  # truncation toward zero, as the reference
    left = np.maximum(edges[:, 0], 1) - 1
    top = np.maximum(edges[:, 1], 1) - 1
    right = np.minimum(edges[:, 2], width)
    bottom = np.minimum(edges[:, 3], height)
    valid = (bottom > top) & (right > left)
    if edge_padding == "zero":
        return edges[:, 1] - 1, edges[:, 3], edges[:, 0] - 1, edges[:, 2], valid
    return top, bottom, left, right, valid


def _pnet_region(
    content: tuple[int, int, int, int] | None, image_size: tuple[int, int], level_size: tuple[int, int]
) -> tuple[tuple[int, slice], tuple[int, slice]] | None:
    """Rows and columns of a pyramid level that P-Net must see to score every cell touching ``content``.

    Per axis ``(first cell, slice of level pixels)``: the slice starts at an even pixel (the cell grid's stride)
    and ends where the last touching cell's 12 pixels end, so each cell is computed from exactly the pixels
    (and max-pool windows) it has in the whole level. None when no cell touches ``content`` (a black image).
    """
    if content is None:
        return (0, slice(None)), (0, slice(None))
    top, bottom, left, right = content
    if bottom <= top or right <= left:
        return None
    return (
        _pnet_axis(top, bottom, image_size[0], level_size[0]),
        _pnet_axis(left, right, image_size[1], level_size[1]),
    )


def _pnet_cells(extent: int) -> int:
    """P-Net output cells along ``extent`` input pixels: conv 3, ceil max-pool 2, conv 3, conv 3."""
    return (extent - 2 + 1) // 2 - 4


def _pnet_axis(start: int, stop: int, image_extent: int, level_extent: int) -> tuple[int, slice]:
    level_start, level_stop = _windows(np.zeros(1, np.int64), np.array([image_extent]), level_extent)
    touching = np.flatnonzero((level_stop[0] > start) & (level_start[0] < stop))  # level pixels that are not black
    cells = _pnet_cells(level_extent)
    first_cell = max(0, -(-(int(touching[0]) - PNET_CELL + 1) // PNET_STRIDE))
    last_cell = min(cells - 1, int(touching[-1]) // PNET_STRIDE)
    return first_cell, slice(PNET_STRIDE * first_cell, min(level_extent, PNET_STRIDE * last_cell + PNET_CELL))


# Pyramid levels whose P-Net region is under this many pixels share one P-Net pass per image: a pass costs ~0.3 ms
# of dispatch whatever its size, and alone such levels cost 2-8x more per pixel than large ones (measured on padded
# CFP, 1 thread: levels under 16 k px were 465 of 550 passes and half of P-Net's time).
PACK_BELOW_PIXELS = 128 * 128


@dataclass(frozen=True)
class _PNetLevel:
    """One pyramid level as P-Net sees it: the level's size, and the region of it that P-Net must score."""

    scale: float
    size: tuple[int, int]  # the whole level, (rows, cols)
    first_row: int  # the region's first cell in the level
    first_col: int
    rows: slice  # the region's pixels in the level
    cols: slice

    @classmethod
    def of(
        cls, scale: float, image_size: tuple[int, int], content: tuple[int, int, int, int] | None
    ) -> "_PNetLevel | None":
        size = (int(image_size[0] * scale + 1), int(image_size[1] * scale + 1))
        region = _pnet_region(content, image_size, size)
        if region is None:
            return None
        (first_row, rows), (first_col, cols) = region
        return cls(scale, size, first_row, first_col, rows, cols)

    @property
    def height(self) -> int:
        return len(range(*self.rows.indices(self.size[0])))

    @property
    def width(self) -> int:
        return len(range(*self.cols.indices(self.size[1])))

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def cells(self) -> tuple[int, int]:
        """P-Net output cells of the region, (rows, cols)."""
        return _pnet_cells(self.height), _pnet_cells(self.width)


@dataclass(frozen=True)
class _Packing:
    height: int
    width: int
    offsets: tuple[tuple[int, int], ...]  # (top, left) of each region, both even: the cell grid's stride
    conv1_mask: torch.Tensor  # (1, 1, height - 2, width - 2), True outside every region's first-conv output


@functools.lru_cache(maxsize=256)
def _packing(sizes: tuple[tuple[int, int], ...]) -> _Packing:
    """Regions of ``sizes`` (rows, cols; largest first, as a pyramid goes) on shelves of one image, without gaps.

    The shelves are as wide as the first two regions side by side; the rest of a pyramid (each level half the
    area of the one before last) then fits on a second shelf, ~30 % of the image unused. A cell only uses its
    own region's pixels, and masking each region's border in the first convolution's output keeps the ceil-mode
    pooling windows at its edges as they are alone, so every region's cells are computed as in a pass of its own.
    """
    even = [(rows + rows % 2, cols + cols % 2) for rows, cols in sizes]
    width = max(sum(cols for _, cols in even[:2]), max(cols for _, cols in even))
    offsets, top, left, shelf = [], 0, 0, 0
    for rows, cols in even:
        if left + cols > width:
            top, left, shelf = top + shelf, 0, 0
        offsets.append((top, left))
        left, shelf = left + cols, max(shelf, rows)
    height = top + shelf
    mask = torch.ones((1, 1, height - 2, width - 2), dtype=torch.bool)
    for (rows, cols), (y, x) in zip(sizes, offsets):
        mask[:, :, y:y + rows - 2, x:x + cols - 2] = False
    return _Packing(height, width, tuple(offsets), mask)


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    scale = PNET_CELL / min_face_size
    short_side = min(height, width) * scale
    scales = []
    while short_side >= PNET_CELL:
        scales.append(scale)
        scale *= factor
        short_side *= factor
    return scales


# ------------------------------------------------------------------------------------------ detector


@dataclass
class _Candidates:
    """Per-image state between stages: boxes ``(N, 4)`` float32 and their scores ``(N,)`` float32."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray | None = None  # (N, 5, 2) after the O-Net

    @classmethod
    def empty(cls) -> "_Candidates":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))

    def take(self, index: np.ndarray) -> "_Candidates":
        lmk = None if self.landmarks is None else self.landmarks[index]
        return _Candidates(self.boxes[index], self.scores[index], lmk)


class MTCNNDetector:
    """The three-stage MTCNN cascade behind the ``Detector`` interface (BGR uint8 in, ``Face`` lists out)."""

    name = "mtcnn"

    def __init__(
        self,
        pnet: PNet,
        rnet: RNet,
        onet: ONet,
        min_face_size: float = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        order: Order = "score",
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        crop_batch_size: int = 512,
        pnet_pixels_per_pass: int = 2**18,
        edge_padding: EdgePadding = "stretch",
        workers: int | None = None,
    ) -> None:
        if min_face_size <= 0:
            raise ValueError(f"min_face_size must be positive, got {min_face_size}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if isinstance(thresholds, str) or len(thresholds) != 3 or not all(0 <= float(t) <= 1 for t in thresholds):
            raise ValueError(f"thresholds must be 3 probabilities (P-, R-, O-Net), got {thresholds!r}")
        if order not in ("score", "area"):
            raise ValueError(f"order must be 'score' or 'area', got {order!r}")
        if batch_size < 1 or crop_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if edge_padding not in ("stretch", "zero"):
            raise ValueError(f"edge_padding must be 'stretch' or 'zero', got {edge_padding!r}")
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.device = torch.device(device)
        self.pnet = pnet.eval().to(self.device)
        self.rnet = rnet.eval().to(self.device)
        self.onet = onet.eval().to(self.device)
        self.min_face_size = float(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.order: Order = order
        self.batch_size = batch_size
        self.crop_batch_size = crop_batch_size
        self.pnet_pixels_per_pass = pnet_pixels_per_pass
        self.edge_padding: EdgePadding = edge_padding
        self.workers = workers
        self._blank_probability: float | None = None  # P-Net's face probability for an all-black cell

    # -------------------------------------------------------------------------------- public API

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        """Faces of each BGR image (grey and BGRA accepted), ordered by ``self.order``."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            raise TypeError("detect takes a sequence of images; wrap a single image in a list")
        rgbs = [to_rgb(image) for image in images]
        results: list[list[Face]] = [[] for _ in rgbs]
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, rgb in enumerate(rgbs):
            if rgb.shape[0] > 0 and rgb.shape[1] > 0:
                by_size.setdefault(rgb.shape[:2], []).append(index)
        chunks = [
            indices[start:start + self.batch_size]
            for indices in by_size.values()
            for start in range(0, len(indices), self.batch_size)
        ]
        chunks.sort(key=lambda chunk: -len(chunk) * rgbs[chunk[0]].size)  # largest first: threads finish together
        for chunk, faces_of_chunk in zip(chunks, self._map_chunks(lambda chunk: [rgbs[i] for i in chunk], chunks)):
            for index, faces in zip(chunk, faces_of_chunk):
                results[index] = faces
        return results

    def _map_chunks(self, images_of, chunks: list[list[int]]):
        """``_detect_same_size`` over ``chunks``, on ``workers`` threads of one intra-op thread each on CPU; a single
        chunk spreads its pyramid levels over them instead."""
        workers = self.workers or torch.get_num_threads()
        if workers <= 1 or self.device.type != "cpu" or not chunks:
            return [self._detect_same_size(images_of(chunk)) for chunk in chunks]
        # torch's OpenMP thread count is per calling thread: this leaves the caller's setting alone.
        threads = workers if len(chunks) == 1 else min(workers, len(chunks))
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            if len(chunks) == 1:
                return [self._detect_same_size(images_of(chunks[0]), pool.map)]
            return list(pool.map(lambda chunk: self._detect_same_size(images_of(chunk)), chunks))

    def detect_arrays(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(boxes (N, 4), probs (N,), points (N, 5, 2))`` float32 per image, like facenet-pytorch's ``detect``."""
        out = []
        for faces in self.detect(images):
            boxes = np.array([f.box for f in faces], np.float32).reshape(-1, 4)
            probs = np.array([f.score for f in faces], np.float32)
            points = np.array([f.landmarks for f in faces], np.float32).reshape(-1, 5, 2)
            out.append((boxes, probs, points))
        return out

    # -------------------------------------------------------------------------------- the cascade

    @torch.inference_mode()
    def _detect_same_size(self, rgbs: list[np.ndarray], level_map=map) -> list[list[Face]]:
        integrals = [IntegralImage(rgb) for rgb in rgbs]
        candidates = self._propose(integrals, level_map)
        candidates = self._refine(integrals, candidates)
        candidates = self._output(integrals, candidates)
        return [self._to_faces(c) for c in candidates]

    def _propose(self, integrals: list[IntegralImage], level_map=map) -> list[_Candidates]:
        height, width = integrals[0].height, integrals[0].width
        threshold = np.float32(self.thresholds[0])
        content = self._content_box(integrals)
        levels = [
            _PNetLevel.of(scale, (height, width), content)
            for scale in pyramid_scales(height, width, self.min_face_size, self.factor)
        ]
        # Large levels get a P-Net pass each, the small ones one pass together (see PACK_BELOW_PIXELS); the passes
        # are independent (``level_map`` may run them on threads).
        present = [k for k, level in enumerate(levels) if level is not None]
        small = [k for k in present if levels[k].pixels < PACK_BELOW_PIXELS]  # type: ignore[union-attr]
        passes = [[k] for k in present if len(small) < 2 or k not in small] + ([small] if len(small) >= 2 else [])

        def run_pass(ks: list[int]) -> list[list[np.ndarray | None]]:
            return self._pnet_pass(integrals, [levels[k] for k in ks], threshold)  # type: ignore[misc]

        per_level: dict[int, list[np.ndarray | None]] = {}
        for ks, found in zip(passes, level_map(run_pass, passes)):
            per_level.update(zip(ks, found))
        # Per image, rows [x1, y1, x2, y2, score, 4 offsets] that survived NMS 0.5 within their level, in pyramid order.
        rows = [[per_level[k][b] for k in present if per_level[k][b] is not None] for b in range(len(integrals))]

        results = []
        for image_rows in rows:
            if not image_rows:
                results.append(_Candidates.empty())
                continue
            found = np.concatenate(image_rows)  # level by level, each level by score: the order ties follow
            found = found[batched_nms(found[:, :4], found[:, 4], np.zeros(len(found), np.int64), 0.7)]
            boxes = square(apply_regression(found[:, :4], found[:, 5:9], plus_one=False))
            results.append(_Candidates(boxes, found[:, 4].copy()))
        return results

    def _pnet_pass(
        self, integrals: list[IntegralImage], levels: list["_PNetLevel"], threshold: np.float32
    ) -> list[list[np.ndarray | None]]:
        """P-Net on ``levels`` of every image in one pass (several levels: packed into one image each); per level,
        per image, its proposals after NMS 0.5 (None when none)."""
        with torch.inference_mode():  # on a pool thread too
            if len(levels) == 1:
                level = levels[0]
                inputs = np.stack([integral.resize(*level.size, level.rows, level.cols) for integral in integrals])
                return [self._level_proposals(*self._run_pnet(inputs), level, threshold)]
            layout = _packing(tuple((level.height, level.width) for level in levels))
            canvases = np.zeros((len(integrals), layout.height, layout.width, 3), np.float32)
            for level, (top, left) in zip(levels, layout.offsets):
                for canvas, integral in zip(canvases, integrals):
                    pixels = integral.resize(*level.size, level.rows, level.cols)
                    canvas[top:top + level.height, left:left + level.width] = pixels
            offsets, probs = self._run_pnet(canvases, layout.conv1_mask)
        found = []
        for level, (top, left) in zip(levels, layout.offsets):
            rows, cols = slice(top // 2, top // 2 + level.cells[0]), slice(left // 2, left // 2 + level.cells[1])
            found.append(self._level_proposals(offsets[:, :, rows, cols], probs[:, rows, cols], level, threshold))
        return found

    @staticmethod
    def _level_proposals(
        offsets: np.ndarray, probs: np.ndarray, level: "_PNetLevel", threshold: np.float32
    ) -> list[np.ndarray | None]:
        """P-Net's outputs over one level's region -> per image the cells' boxes after NMS 0.5, None when none."""
        scale32 = np.float32(level.scale)
        found: list[np.ndarray | None] = []
        for b in range(len(probs)):
            ys, xs = np.nonzero(probs[b] >= threshold)
            if ys.size == 0:
                found.append(None)
                continue
            scores = probs[b, ys, xs]
            region_offsets = offsets[b][:, ys, xs].T
            cells = np.stack([xs + level.first_col, ys + level.first_row], axis=1).astype(np.float32)  # in the level
            corner1 = np.floor((PNET_STRIDE * cells + 1) / scale32)
            corner2 = np.floor((PNET_STRIDE * cells + PNET_CELL) / scale32)
            rows = np.concatenate([corner1, corner2, scores[:, None], region_offsets], axis=1)
            found.append(rows[batched_nms(rows[:, :4], scores, np.zeros(len(rows), np.int64), 0.5)])
        return found

    def _refine(self, integrals: list[IntegralImage], candidates: list[_Candidates]) -> list[_Candidates]:
        candidates, crops = self._crops(integrals, candidates, RNET_SIZE)
        outputs = self._run_on_crops(self.rnet, crops)
        results = []
        threshold = np.float32(self.thresholds[1])
        for cand, (offsets, probs) in zip(candidates, _split(outputs, [len(c.scores) for c in candidates])):
            passed = probs > threshold
            cand = _Candidates(cand.boxes[passed], probs[passed])
            offsets = offsets[passed]
            keep = batched_nms(cand.boxes, cand.scores, np.zeros(len(cand.scores), np.int64), 0.7)
            cand, offsets = cand.take(keep), offsets[keep]
            results.append(_Candidates(square(apply_regression(cand.boxes, offsets, plus_one=True)), cand.scores))
        return results

    def _output(self, integrals: list[IntegralImage], candidates: list[_Candidates]) -> list[_Candidates]:
        candidates, crops = self._crops(integrals, candidates, ONET_SIZE)
        outputs = self._run_on_crops(self.onet, crops)
        results = []
        threshold = np.float32(self.thresholds[2])
        for cand, (offsets, fractions, probs) in zip(candidates, _split(outputs, [len(c.scores) for c in candidates])):
            passed = probs > threshold
            boxes, scores, offsets, fractions = cand.boxes[passed], probs[passed], offsets[passed], fractions[passed]
            # Landmarks are placed in the O-Net input box (before its own regression), 1-based like the boxes.
            w = boxes[:, 2:3] - boxes[:, 0:1] + 1
            h = boxes[:, 3:4] - boxes[:, 1:2] + 1
            xs = w * fractions[:, :5] + boxes[:, 0:1] - 1
            ys = h * fractions[:, 5:] + boxes[:, 1:2] - 1
            landmarks = np.stack([xs, ys], axis=2)
            boxes = apply_regression(boxes, offsets, plus_one=True)
            keep = nms_min(boxes, scores, 0.7)
            results.append(_Candidates(boxes[keep], scores[keep], landmarks[keep]))
        return results

    # -------------------------------------------------------------------------------- helpers

    def _content_box(self, integrals: list[IntegralImage]) -> tuple[int, int, int, int] | None:
        """The span of non-black pixels of all ``integrals`` together, or None when P-Net must see everything.

        A P-Net cell that sees only black pixels has one fixed output; when that output is below the P-Net
        threshold (it is, for the released weights) such cells never propose a box, so the black borders of
        padded images (the evaluation commands add one) need no P-Net pass: same proposals, less work.
        """
        if self._blank_cell_passes():
            return None
        boxes = np.array([integral.content_box() for integral in integrals])
        if (boxes[:, 1] > boxes[:, 0]).any():
            boxes = boxes[boxes[:, 1] > boxes[:, 0]]
        return int(boxes[:, 0].min()), int(boxes[:, 1].max()), int(boxes[:, 2].min()), int(boxes[:, 3].max())

    def _blank_cell_passes(self) -> bool:
        if self._blank_probability is None:
            blank = np.zeros((1, PNET_CELL, PNET_CELL, 3), np.float32)
            with torch.inference_mode():
                self._blank_probability = float(self.pnet(self._to_input(blank))[1].max())
        return self._blank_probability >= self.thresholds[0]


    def _run_pnet(self, inputs: np.ndarray, conv1_mask: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """P-Net on ``inputs`` (N, H, W, 3); large inputs one at a time (measured: on CPU a batch of large levels
        is slower than the same images one by one, small levels gain from batching)."""
        per_pass = max(1, self.pnet_pixels_per_pass // (inputs.shape[1] * inputs.shape[2]))
        outputs = []
        for start in range(0, len(inputs), per_pass):
            offsets, probs = self.pnet(self._to_input(inputs[start:start + per_pass]), conv1_mask)
            outputs.append((offsets.cpu().numpy(), probs.cpu().numpy()))
        return np.concatenate([o for o, _ in outputs]), np.concatenate([p for _, p in outputs])

    def _to_input(self, nhwc: np.ndarray) -> torch.Tensor:
        # NHWC memory viewed as NCHW (channels-last), the layout the reference feeds its networks.
        return normalize_rgb(torch.from_numpy(nhwc).to(self.device).permute(0, 3, 1, 2))

    def _crops(
        self, integrals: list[IntegralImage], candidates: list[_Candidates], size: int
    ) -> tuple[list[_Candidates], np.ndarray]:
        """Area-resized crops of every candidate of every image, dropping boxes that lie outside the image."""
        kept, crops = [], []
        for integral, cand in zip(integrals, candidates):
            top, bottom, left, right, valid = crop_windows(cand.boxes, integral.width, integral.height, self.edge_padding)
            cand = cand.take(np.flatnonzero(valid))
            kept.append(cand)
            if valid.any():
                crops.append(integral.crops(top[valid], bottom[valid], left[valid], right[valid], size))
        if not crops:
            return kept, np.zeros((0, size, size, 3), np.float32)
        return kept, np.concatenate(crops)

    def _run_on_crops(self, net: torch.nn.Module, crops: np.ndarray) -> list[np.ndarray]:
        if len(crops) == 0:
            shapes = [(0, 4), (0, 10), (0,)] if isinstance(net, ONet) else [(0, 4), (0,)]
            return [np.zeros(shape, np.float32) for shape in shapes]
        chunks = [
            [t.cpu().numpy() for t in net(self._to_input(crops[i:i + self.crop_batch_size]))]
            for i in range(0, len(crops), self.crop_batch_size)
        ]
        return [np.concatenate(parts) for parts in zip(*chunks)]

    def _to_faces(self, cand: _Candidates) -> list[Face]:
        if self.order == "area":
            # facenet-pytorch select_largest=True: numpy's default argsort of float32 areas, reversed.
            areas = (cand.boxes[:, 2] - cand.boxes[:, 0]) * (cand.boxes[:, 3] - cand.boxes[:, 1])
            ranking = np.argsort(areas)[::-1]
        else:
            ranking = np.argsort(-cand.scores, kind="stable")
        assert cand.landmarks is not None
        return [Face(cand.boxes[i], float(cand.scores[i]), cand.landmarks[i]) for i in ranking]


def _split(outputs: list[np.ndarray], counts: list[int]) -> list[list[np.ndarray]]:
    bounds = np.cumsum([0] + counts)
    return [[out[a:b] for out in outputs] for a, b in zip(bounds[:-1], bounds[1:])]


# ------------------------------------------------------------------------------------------- weights


def _mtcnn_state_dicts(weights: str | os.PathLike | None) -> dict[str, dict[str, torch.Tensor]]:
    """P/R/O-Net state dicts from the bundled files, a folder, or one combined file.

    A folder holds facenet-pytorch's ``{pnet,rnet,onet}.pt`` (its ``data/`` folder) or our
    ``mtcnn_{pnet,rnet,onet}.pt``; a single file is a saved ``facenet_pytorch.MTCNN`` state dict whose
    keys start with ``pnet.``, ``rnet.``, ``onet.``.
    """
    nets = ("pnet", "rnet", "onet")
    if weights is None:
        return {net: read_state_dict(bundled(DEFAULT_WEIGHTS[net])) for net in nets}
    path = Path(weights)
    if path.is_dir():
        files = {}
        for net in nets:
            options = [path / f"{net}.pt", path / DEFAULT_WEIGHTS[net]]
            existing = [p for p in options if p.is_file()]
            if not existing:
                raise CheckpointError(f"no {net} weights in {path}: expected {options[0].name} or {options[1].name}")
            files[net] = existing[0]
        return {net: read_state_dict(file) for net, file in files.items()}
    combined = read_state_dict(path)
    split: dict[str, dict[str, torch.Tensor]] = {net: {} for net in nets}
    for key, value in combined.items():
        net, _, rest = key.partition(".")
        if net not in split or not rest:
            raise CheckpointError(
                f"{path} is not a combined MTCNN state dict: key {key!r} does not start with pnet./rnet./onet."
            )
        split[net][rest] = value
    return split


def load_mtcnn_nets(weights: str | os.PathLike | None = None) -> tuple[PNet, RNet, ONet]:
    """Build the three nets and load their weights strictly (see ``_mtcnn_state_dicts`` for accepted layouts)."""
    state_dicts = _mtcnn_state_dicts(weights)
    nets = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}
    source = "bundled MTCNN weights" if weights is None else str(weights)
    for name, net in nets.items():
        sd = checkpoint_filter(state_dicts[name], net)
        load_state_dict_strict(net, sd, source=f"{source} [{name}]")
    return nets["pnet"], nets["rnet"], nets["onet"]  # type: ignore[return-value]


def create_mtcnn(weights: str | os.PathLike | None = None, device: str = "cpu", **options) -> MTCNNDetector:
    """Factory behind ``create_detector("mtcnn")``.

    Options: ``min_face_size`` (20), ``thresholds`` ((0.6, 0.7, 0.7)), ``factor`` (0.709),
    ``order`` ("score" | "area"), ``batch_size`` (images processed together, 8), ``crop_batch_size`` (R/O-Net
    crops per forward pass, 512), ``pnet_pixels_per_pass`` (pyramid-level pixels per P-Net pass, 2**18),
    ``edge_padding`` ("stretch": facenet-pytorch parity | "zero": the original MTCNN, right on faces that fill
    the frame; see ``crop_windows``), ``workers`` (threads for the images of one call on CPU; torch's thread
    count).
    """
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ValueError(f"unknown MTCNN option(s) {', '.join(unknown)}; known: {', '.join(sorted(_OPTIONS))}")
    pnet, rnet, onet = load_mtcnn_nets(weights)
    return MTCNNDetector(pnet, rnet, onet, device=device, **options)


_OPTIONS = frozenset(
    {
        "min_face_size", "thresholds", "factor", "order", "batch_size", "crop_batch_size", "pnet_pixels_per_pass",
        "edge_padding", "workers",
    }
)
