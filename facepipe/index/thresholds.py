"""What a search score means: per-model cosine thresholds at a false accept rate, measured on CFP.

A gallery score is the cosine similarity of L2-normalised (flip-summed) embeddings; "same person" is a threshold
on it, and the right threshold depends on the model. ``thresholds.json`` (package data) holds, per model, the
score above which a given fraction (FAR) of different-person pairs still falls, measured on CFP by
``eval/calibrate_thresholds.py`` (the README says how), with the command, date and CPU that produced it.

A model is recognised by name for bundled weights and by the SHA-256 of its weights file otherwise, so a
threshold is never shown for weights it was not measured with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from facepipe.io.digest import file_fingerprint

THRESHOLDS_FILE = Path(__file__).with_name("thresholds.json")
CALIBRATE_HINT = (
    "no calibrated thresholds for this model; measure them with "
    "`python eval/calibrate_thresholds.py --root CFP_ROOT --model MODEL [--weights FILE]` (see the README)"
)


@dataclass(frozen=True)
class Calibration:
    """Cosine thresholds of one model: ``thresholds[far]`` is the score above which a fraction ``far`` of
    different-person pairs falls; ``tar[far]`` the fraction of same-person pairs above it."""

    key: str
    thresholds: dict[str, float]
    tar: dict[str, float]
    provenance: dict[str, Any]

    def describe(self) -> str:
        parts = [f"{self.thresholds[far]:.3f} (FAR {far}, TAR {self.tar[far]:.3f})" for far in self.thresholds]
        return (
            f"same person if score > {' or '.join(parts)}; thresholds measured on "
            f"{self.provenance.get('data', 'CFP')} ({self.provenance.get('date', '?')})"
        )


def weights_key(model: str, weights: str | os.PathLike | None) -> str:
    """``model`` for its bundled weights, ``sha256:<hex>`` of the weights file otherwise."""
    if weights is None or str(weights) == "bundled":
        return model
    return f"sha256:{file_fingerprint(weights)}"


@lru_cache(maxsize=1)
def _table(path: str = str(THRESHOLDS_FILE)) -> dict[str, Any]:
    if not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def calibration_for(model: str | None, weights: str | os.PathLike | None) -> Calibration | None:
    """The stored calibration of a gallery's model, or None (unknown model, weights file gone)."""
    if not model:
        return None
    try:
        key = weights_key(model, weights)
    except OSError:
        return None
    entry = _table().get("models", {}).get(key)
    if entry is None:
        return None
    return Calibration(key, dict(entry["thresholds"]), dict(entry["tar"]), dict(entry.get("provenance", {})))


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """The score with at most a fraction ``far`` of ``impostor_scores`` strictly above it (barring ties)."""
    if len(impostor_scores) == 0:
        raise ValueError("no different-person scores to calibrate on")
    allowed = int(np.floor(far * len(impostor_scores)))
    kth = max(0, len(impostor_scores) - 1 - allowed)  # the (allowed+1)-th largest score
    return float(np.partition(impostor_scores, kth)[kth])


def all_impostor_scores(embeddings: np.ndarray, identities: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Cosine scores of every pair of L2-normalised ``embeddings`` with different identities, each pair once."""
    parts = []
    columns = np.arange(len(embeddings))[None, :]
    for start in range(0, len(embeddings), chunk):
        rows = np.arange(start, min(start + chunk, len(embeddings)))[:, None]
        different = (identities[rows] != identities[columns]) & (columns > rows)
        parts.append((embeddings[start:start + chunk] @ embeddings.T)[different])
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
