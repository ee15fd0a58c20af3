"""Anchor matching and target encoding for RetinaFace training (Pytorch_Retinaface ``box_utils`` semantics).

Priors are ``(P, 4)`` normalised ``cx, cy, w, h`` (the order of ``facepipe.detection.priors``); ground-truth
boxes are normalised ``x1, y1, x2, y2`` and landmarks normalised ``(x, y) * 5``. ``encode_boxes`` and
``encode_landmarks`` are the exact inverses of the inference-time ``decode`` / ``decode_landmarks``
(variances 0.1 for centres, 0.2 for log sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Variances = tuple[float, float]
DEFAULT_VARIANCES: Variances = (0.1, 0.2)


@dataclass(frozen=True)
class MatchConfig:
    # A prior is positive when its best IoU with a face is >= positive_iou (reference: 0.35).
    positive_iou: float = 0.35
    # A face whose best prior overlaps it less than this is left out of training entirely (reference: 0.2):
    # forcing a match for it would teach the net to call an unrelated anchor a face.
    ignore_face_below_iou: float = 0.2
    variances: Variances = DEFAULT_VARIANCES


def point_form(priors: torch.Tensor) -> torch.Tensor:
    """``cx, cy, w, h`` -> ``x1, y1, x2, y2``."""
    return torch.cat([priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], dim=1)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``(A, B)`` IoU of xyxy boxes, continuous coordinates (no +1, as in the reference ``jaccard``)."""
    top_left = torch.max(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.min(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area_a = ((boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1]))[:, None]
    area_b = ((boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1]))[None, :]
    return inter / (area_a + area_b - inter)


def encode_boxes(matched: torch.Tensor, priors: torch.Tensor, variances: Variances = DEFAULT_VARIANCES) -> torch.Tensor:
    """Regression targets for xyxy ``matched`` boxes against ``priors``; inverse of ``decode``."""
    centre = ((matched[:, :2] + matched[:, 2:]) / 2 - priors[:, :2]) / (variances[0] * priors[:, 2:])
    # Degenerate boxes are filtered out by the data pipeline; the clamp only keeps log() finite.
    size = ((matched[:, 2:] - matched[:, :2]) / priors[:, 2:]).clamp(min=1e-12)
    return torch.cat([centre, torch.log(size) / variances[1]], dim=1)


def encode_landmarks(matched: torch.Tensor, priors: torch.Tensor, variances: Variances = DEFAULT_VARIANCES) -> torch.Tensor:
    """``(P, 10)`` landmark targets; inverse of ``decode_landmarks``."""
    points = matched.reshape(-1, 5, 2)
    offsets = (points - priors[:, None, :2]) / (variances[0] * priors[:, None, 2:])
    return offsets.reshape(-1, 10)


@dataclass
class MatchedTargets:
    boxes: torch.Tensor  # (P, 4) encoded regression targets
    landmarks: torch.Tensor  # (P, 10) encoded landmark targets
    labels: torch.Tensor  # (P,) int64: 0 background, 1 face with landmarks, -1 face without landmarks


def match(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    landmarks: torch.Tensor,
    priors: torch.Tensor,
    config: MatchConfig = MatchConfig(),
) -> MatchedTargets:
    """Assign each prior a face (or background) and encode its targets.

    ``boxes`` ``(G, 4)`` normalised xyxy, ``labels`` ``(G,)`` +1/-1 (landmarks present / absent),
    ``landmarks`` ``(G, 10)`` normalised. Every face whose best prior reaches ``ignore_face_below_iou`` is
    force-matched to that prior even when the IoU is below ``positive_iou``.
    """
    num_priors = priors.shape[0]
    device = priors.device
    empty = MatchedTargets(
        boxes=torch.zeros(num_priors, 4, device=device),
        landmarks=torch.zeros(num_priors, 10, device=device),
        labels=torch.zeros(num_priors, dtype=torch.long, device=device),
    )
    if boxes.shape[0] == 0:
        return empty
    overlaps = box_iou(boxes, point_form(priors))  # (G, P)
    best_prior_iou, best_prior_idx = overlaps.max(dim=1)
    valid = best_prior_iou >= config.ignore_face_below_iou
    if not bool(valid.any()):
        return empty
    best_face_iou, best_face_idx = overlaps.max(dim=0)  # (P,)
    forced_priors = best_prior_idx[valid]
    best_face_iou[forced_priors] = 2.0  # above any threshold
    # The reference also re-assigns the best prior of ignored faces (its loop runs over all faces), which can
    # steal a prior from a valid face; only valid faces are forced here. When two faces share a best prior
    # the later one wins, as in the reference loop ("amax" keeps that deterministic on every device).
    valid_faces = torch.nonzero(valid).flatten()
    best_face_idx.scatter_reduce_(0, forced_priors, valid_faces, reduce="amax", include_self=False)
    prior_labels = labels.to(torch.long)[best_face_idx]
    prior_labels[best_face_iou < config.positive_iou] = 0
    return MatchedTargets(
        boxes=encode_boxes(boxes[best_face_idx], priors, config.variances),
        landmarks=encode_landmarks(landmarks[best_face_idx], priors, config.variances),
        labels=prior_labels,
    )
