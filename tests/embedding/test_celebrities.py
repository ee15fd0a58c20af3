"""End to end on real photos: RetinaFace detection -> ArcFace alignment -> bundled MobileFaceNet."""

import numpy as np
import pandas as pd
import pytest

from facepipe.alignment.similarity import align_faces
from facepipe.detection.base import create_detector
from facepipe.embedding import create_embedder, l2_normalize
from facepipe.io.images import read_image
from tests.conftest import shared_path


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a same-person pair scores above a different-person pair (ties count half)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


@pytest.fixture(scope="module")
def celebrity_embeddings():
    root = shared_path("images", "celebrities")
    table = pd.read_csv(root / "identities.csv")
    images = [read_image(root / name) for name in table["file"]]
    detections = create_detector("retinaface").detect(images)
    assert all(len(faces) > 0 for faces in detections)
    best = [[faces[0]] for faces in detections]  # highest score first
    crops = np.concatenate(align_faces(images, best, 112))
    embeddings = create_embedder("mobilefacenet", batch_size=16).embed(crops, flip=True)
    return embeddings, table["identity"].to_numpy()


def test_same_person_pairs_score_clearly_above_different_person_pairs(celebrity_embeddings):
    embeddings, identities = celebrity_embeddings
    similarity = l2_normalize(embeddings) @ l2_normalize(embeddings).T
    upper = np.triu_indices(len(identities), k=1)
    same = (identities[:, None] == identities[None, :])[upper]
    scores = similarity[upper]
    positive, negative = scores[same], scores[~same]
    assert len(positive) >= 15 and len(negative) >= 400
    assert roc_auc(positive, negative) >= 0.99
    assert positive.mean() - negative.mean() > 0.45  # measured: 0.70 vs 0.06
    assert np.median(positive) > np.percentile(negative, 99) + 0.05


def test_raw_norms_are_a_quality_signal_not_unit(celebrity_embeddings):
    embeddings, _ = celebrity_embeddings
    norms = np.linalg.norm(embeddings, axis=1)
    assert norms.min() > 5 and not np.allclose(norms, 1.0)
