import numpy as np
import pytest
import torch

from facepipe.detection.box_ops import decode, decode_landmarks
from facepipe.detection.priors import prior_boxes
from facepipe.train.matching import MatchConfig, box_iou, encode_boxes, encode_landmarks, match, point_form


def _random_boxes(generator: torch.Generator, n: int) -> torch.Tensor:
    top_left = torch.rand(n, 2, generator=generator) * 0.7
    size = torch.rand(n, 2, generator=generator) * 0.25 + 0.01
    return torch.cat([top_left, top_left + size], dim=1)


def test_encode_is_exact_inverse_of_decode():
    generator = torch.Generator().manual_seed(0)
    priors = torch.from_numpy(prior_boxes(320, 256).copy())
    boxes = _random_boxes(generator, priors.shape[0])
    landmarks = torch.rand(priors.shape[0], 10, generator=generator)
    loc = encode_boxes(boxes, priors)
    landm = encode_landmarks(landmarks, priors)
    torch.testing.assert_close(decode(loc, priors), boxes, atol=2e-6, rtol=0)
    torch.testing.assert_close(decode_landmarks(landm, priors), landmarks, atol=2e-6, rtol=0)
    # and the other way round: decoding arbitrary offsets then encoding gives the offsets back
    offsets = torch.randn(priors.shape[0], 4, generator=generator)
    torch.testing.assert_close(encode_boxes(decode(offsets, priors), priors), offsets, atol=2e-4, rtol=1e-4)


def test_encode_matches_numpy_decode_too():
    priors = prior_boxes(64, 64)
    boxes = np.array([[0.1, 0.2, 0.3, 0.5]], dtype=np.float32).repeat(len(priors), 0)
    loc = encode_boxes(torch.from_numpy(boxes), torch.from_numpy(priors.copy())).numpy()
    np.testing.assert_allclose(decode(loc, priors), boxes, atol=2e-6)


def _priors(*boxes_cxcywh):
    return torch.tensor(boxes_cxcywh, dtype=torch.float32)


FACE = torch.tensor([[0.0, 0.0, 0.2, 0.2]])
LANDMARKS = torch.full((1, 10), 0.1)


def test_iou_without_plus_one():
    iou = box_iou(FACE, torch.tensor([[0.1, 0.0, 0.3, 0.2]]))
    assert float(iou) == pytest.approx(0.02 / 0.06)


def test_prior_above_positive_threshold_is_matched_with_label():
    priors = _priors([0.1, 0.1, 0.3, 0.3], [0.8, 0.8, 0.1, 0.1])  # IoU 0.444 and 0
    out = match(FACE, torch.tensor([1.0]), LANDMARKS, priors)
    assert out.labels.tolist() == [1, 0]
    torch.testing.assert_close(decode(out.boxes[:1], priors[:1]), FACE, atol=1e-6, rtol=0)
    torch.testing.assert_close(decode_landmarks(out.landmarks[:1], priors[:1]), LANDMARKS, atol=1e-6, rtol=0)


def test_best_prior_below_threshold_is_force_matched_only_once():
    # IoUs 0.25 (best) and 0.2116 (second): both below 0.35, only the best prior is forced positive
    priors = _priors([0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4348, 0.4348], [0.9, 0.9, 0.1, 0.1])
    ious = box_iou(FACE, point_form(priors))[0]
    assert 0.2 < float(ious[1]) < float(ious[0]) < 0.35
    out = match(FACE, torch.tensor([-1.0]), LANDMARKS, priors)
    assert out.labels.tolist() == [-1, 0, 0]


def test_face_whose_best_prior_is_below_ignore_threshold_is_ignored():
    priors = _priors([0.1, 0.1, 0.5, 0.5], [0.9, 0.9, 0.1, 0.1])  # best IoU 0.16 < 0.2
    out = match(FACE, torch.tensor([1.0]), LANDMARKS, priors)
    assert out.labels.tolist() == [0, 0]
    # a looser ignore threshold forces the match again
    out = match(FACE, torch.tensor([1.0]), LANDMARKS, priors, MatchConfig(ignore_face_below_iou=0.1))
    assert out.labels.tolist() == [1, 0]


def test_ignored_face_does_not_steal_a_prior_from_a_valid_face():
    # The tiny face's best prior is prior 0 (IoU < 0.2) which is a good match for the big face.
    big = torch.tensor([0.0, 0.0, 0.2, 0.2])
    tiny = torch.tensor([0.09, 0.09, 0.1, 0.1])
    priors = _priors([0.1, 0.1, 0.2, 0.2])
    out = match(torch.stack([big, tiny]), torch.tensor([1.0, -1.0]), LANDMARKS.repeat(2, 1), priors)
    assert out.labels.tolist() == [1]
    torch.testing.assert_close(decode(out.boxes, priors), big[None], atol=1e-6, rtol=0)


def test_positive_threshold_is_configurable():
    priors = _priors([0.1, 0.1, 0.3, 0.3], [0.1, 0.1, 0.2, 0.2])  # IoU 0.444 and 1.0
    assert match(FACE, torch.tensor([1.0]), LANDMARKS, priors).labels.tolist() == [1, 1]
    strict = MatchConfig(positive_iou=0.5)
    assert match(FACE, torch.tensor([1.0]), LANDMARKS, priors, strict).labels.tolist() == [0, 1]


def test_no_faces_gives_all_background():
    priors = torch.from_numpy(prior_boxes(64, 64).copy())
    out = match(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 10), priors)
    assert out.labels.shape == (len(priors),) and int(out.labels.abs().sum()) == 0


def test_every_valid_face_gets_a_positive_on_real_priors():
    generator = torch.Generator().manual_seed(1)
    priors = torch.from_numpy(prior_boxes(320, 320).copy())
    faces = _random_boxes(generator, 20)
    faces[:, 2:] = faces[:, :2] + (faces[:, 2:] - faces[:, :2]).clamp(min=0.06)  # >= 19 px: always valid
    out = match(faces, torch.ones(20), torch.rand(20, 10, generator=generator), priors)
    positives = torch.nonzero(out.labels).flatten()
    decoded = decode(out.boxes[positives], priors[positives])
    ious = box_iou(decoded, faces)
    assert torch.allclose(ious.max(dim=1).values, torch.ones(len(positives)), atol=1e-5)
    assert set(ious.argmax(dim=1).tolist()) == set(range(20))


def test_two_faces_sharing_a_best_prior_later_face_wins_as_in_reference():
    priors = _priors([0.1, 0.1, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1])
    a = torch.tensor([0.0, 0.0, 0.2, 0.2])
    b = torch.tensor([0.01, 0.01, 0.19, 0.19])
    out = match(torch.stack([a, b]), torch.tensor([1.0, -1.0]), LANDMARKS.repeat(2, 1), priors)
    assert out.labels.tolist() == [-1, 0]
    torch.testing.assert_close(decode(out.boxes[:1], priors[:1]), b[None], atol=1e-6, rtol=0)
