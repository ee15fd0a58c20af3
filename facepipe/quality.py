"""Per-face quality measures, stored in the align and embedding manifests and ranked by ``eval quality``.

Each is "higher = better", so an error-versus-reject curve (``facepipe.evaluation.quality``) rejects the lowest:

* ``detector_score``: the detector's face score;
* ``embedding_norm``: the L2 norm of the raw embedding (the flip-summed one) — larger for clear faces in
  margin-loss models (MagFace makes this explicit; ArcFace-family models show it too);
* ``inter_ocular``: the distance between the eye landmarks in original pixels (resolution);
* ``yaw``: ``−|yaw|`` in degrees, estimated from the five landmarks (``landmark_yaw``); manifests store the
  signed yaw;
* ``sharpness``: the variance of the Laplacian of the grey aligned crop (blur lowers it).
"""

from __future__ import annotations

import cv2
import numpy as np

def inter_ocular_distance(landmarks: np.ndarray) -> np.ndarray:
    """Eye-to-eye distance of ``(N, 5, 2)`` landmarks (image order: image-left eye first), in their pixels."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    return np.linalg.norm(landmarks[:, 1] - landmarks[:, 0], axis=1)


def landmark_yaw(landmarks: np.ndarray) -> np.ndarray:
    """Yaw in degrees from five landmarks, signed (positive: the nose lies towards the image-right eye).

    The nose tip of a head turned by ``θ`` moves sideways by about ``depth · sin θ`` while the eye baseline
    shrinks by ``cos θ``; with the nose ``depth`` ≈ half the frontal inter-ocular distance (average adult
    anthropometry), ``sin θ ≈ 2 · offset / baseline_frontal``. We only see the projected baseline, so the ratio
    ``offset / (baseline / 2)`` is ``tan θ``-like; ``arctan`` of it is monotonic in the true yaw, exact at 0 and
    saturating towards ±90° — enough to rank faces, which is all an EVRC uses. The offset is measured along
    the eye axis (roll-invariant) from the eyes' midpoint.
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    left, right, nose = landmarks[:, 0], landmarks[:, 1], landmarks[:, 2]
    axis = right - left
    baseline = np.linalg.norm(axis, axis=1)
    unit = axis / np.maximum(baseline, 1e-9)[:, None]
    offset = np.sum((nose - (left + right) / 2.0) * unit, axis=1)
    return np.degrees(np.arctan2(offset, np.maximum(baseline / 2.0, 1e-9)))


def laplacian_sharpness(crops: np.ndarray) -> np.ndarray:
    """Variance of the Laplacian of each ``(N, H, W, 3)`` BGR uint8 crop, in grey levels²."""
    out = np.empty(len(crops), dtype=np.float64)
    for i, crop in enumerate(crops):
        grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_BGR2GRAY)
        out[i] = cv2.Laplacian(grey, cv2.CV_64F).var()
    return out


def face_measures(
    scores: np.ndarray, embeddings: np.ndarray, landmarks: np.ndarray, crops: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every per-face measure (higher = better) for ``N`` faces; ``sharpness`` only when crops are given."""
    measures = {
        "detector_score": np.asarray(scores, dtype=np.float64),
        "embedding_norm": np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1),
        "inter_ocular": inter_ocular_distance(landmarks),
        "yaw": -np.abs(landmark_yaw(landmarks)),
    }
    if crops is not None:
        measures["sharpness"] = laplacian_sharpness(crops)
    return measures
