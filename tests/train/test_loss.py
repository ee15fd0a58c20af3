import pytest
import torch
import torch.nn.functional as F

from facepipe.detection.priors import prior_boxes
from facepipe.train.loss import LossConfig, LossWeights, hard_negative_mask, match_batch, multibox_loss
from facepipe.train.matching import MatchConfig


def test_ohem_keeps_exactly_ratio_times_positives_with_highest_loss():
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(2, 100, generator=generator)
    positives = torch.zeros(2, 100, dtype=torch.bool)
    positives[0, [3, 50, 70]] = True
    positives[1, [5]] = True
    loss[0, 3] = 10.0  # a positive with a huge loss must never be picked as a negative
    mask = hard_negative_mask(loss, positives, ratio=7)
    assert mask.sum(dim=1).tolist() == [21, 7]
    assert not (mask & positives).any()
    for row in range(2):
        kept_min = loss[row][mask[row]].min()
        dropped = loss[row][~mask[row] & ~positives[row]]
        assert float(kept_min) >= float(dropped.max())


def test_ohem_count_is_clamped_at_the_number_of_background_priors():
    positives = torch.zeros(1, 20, dtype=torch.bool)
    positives[0, :4] = True  # 4 * 7 = 28 > 16 background priors
    mask = hard_negative_mask(torch.rand(1, 20), positives, ratio=7)
    assert int(mask.sum()) == 16
    assert int(hard_negative_mask(torch.rand(1, 20), torch.zeros(1, 20, dtype=torch.bool), 7).sum()) == 0


def _targets(with_landmarks: bool) -> list[torch.Tensor]:
    box = [0.3, 0.3, 0.6, 0.65]
    landmarks = [0.4, 0.4, 0.5, 0.4, 0.45, 0.5, 0.4, 0.6, 0.5, 0.6] if with_landmarks else [0.0] * 10
    label = 1.0 if with_landmarks else -1.0
    return [torch.tensor([box + landmarks + [label]])]


def _reference_loss(loc, conf, landm, targets, priors, config: LossConfig):
    """The reference MultiBoxLoss arithmetic written out step by step, for one image."""
    matched = match_batch(targets, priors, config.match)
    labels = matched.labels[0]
    pos = labels != 0
    pos_landm = labels > 0
    loss_l = F.smooth_l1_loss(loc[0][pos], matched.boxes[0][pos], reduction="sum")
    loss_landm = F.smooth_l1_loss(landm[0][pos_landm], matched.landmarks[0][pos_landm], reduction="sum")
    per_prior = torch.logsumexp(conf[0], dim=1) - conf[0][:, 0]
    per_prior[pos] = 0
    num_pos = int(pos.sum())
    negatives = per_prior.argsort(descending=True)[: config.negatives_per_positive * num_pos]
    chosen = torch.cat([torch.nonzero(pos).flatten(), negatives])
    loss_c = F.cross_entropy(conf[0][chosen], pos.long()[chosen], reduction="sum")
    n = max(num_pos, 1)
    return loss_l / n, loss_c / n, loss_landm / max(int(pos_landm.sum()), 1)


@pytest.mark.parametrize("with_landmarks", [True, False])
def test_loss_matches_step_by_step_reference(with_landmarks):
    generator = torch.Generator().manual_seed(3)
    priors = torch.from_numpy(prior_boxes(128, 128).copy())
    p = len(priors)
    loc, conf, landm = (torch.randn(1, p, k, generator=generator) for k in (4, 2, 10))
    targets = _targets(with_landmarks)
    config = LossConfig()
    parts = multibox_loss(loc, conf, landm, targets, priors, config)
    loss_l, loss_c, loss_landm = _reference_loss(loc, conf, landm, targets, priors, config)
    torch.testing.assert_close(parts.box, loss_l)
    torch.testing.assert_close(parts.classification, loss_c)
    torch.testing.assert_close(parts.landmarks, loss_landm)
    torch.testing.assert_close(parts.total, 2.0 * loss_l + loss_c + 1.0 * loss_landm)
    assert parts.num_negatives == 7 * parts.num_positives > 0
    if not with_landmarks:
        assert float(parts.landmarks) == 0.0  # faces without landmarks train box and class only


def test_paper_weights_and_ratio_are_configurable():
    generator = torch.Generator().manual_seed(4)
    priors = torch.from_numpy(prior_boxes(128, 128).copy())
    p = len(priors)
    loc, conf, landm = (torch.randn(1, p, k, generator=generator) for k in (4, 2, 10))
    paper = LossConfig(weights=LossWeights(box=0.25, classification=1.0, landmarks=0.1), negatives_per_positive=3)
    parts = multibox_loss(loc, conf, landm, _targets(True), priors, paper)
    torch.testing.assert_close(parts.total, 0.25 * parts.box + parts.classification + 0.1 * parts.landmarks)
    assert parts.num_negatives == 3 * parts.num_positives


def test_perfect_predictions_give_near_zero_regression_loss_and_gradients_flow():
    priors = torch.from_numpy(prior_boxes(128, 128).copy())
    targets = _targets(True)
    matched = match_batch(targets, priors, MatchConfig())
    loc = matched.boxes.clone().requires_grad_(True)
    landm = matched.landmarks.clone().requires_grad_(True)
    conf = torch.zeros(1, len(priors), 2, requires_grad=True)
    parts = multibox_loss(loc, conf, landm, targets, priors)
    assert float(parts.box.detach()) < 1e-10 and float(parts.landmarks.detach()) < 1e-10
    assert float(parts.classification.detach()) == pytest.approx(8 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    parts.total.backward()
    assert conf.grad is not None and float(conf.grad.abs().sum()) > 0


def test_image_without_faces_contributes_nothing():
    priors = torch.from_numpy(prior_boxes(64, 64).copy())
    p = len(priors)
    parts = multibox_loss(torch.randn(1, p, 4), torch.randn(1, p, 2), torch.randn(1, p, 10), [torch.zeros(0, 15)], priors)
    assert float(parts.total) == 0.0 and parts.num_positives == 0 and parts.num_negatives == 0
