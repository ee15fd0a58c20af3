"""RetinaFace multi-task loss: softmax face/background with OHEM, smooth-L1 box and landmark regression.

Weights: the reference code (Pytorch_Retinaface ``train.py``) uses ``2.0 * box + class + 1.0 * landmarks``
(the defaults here); the paper writes ``class + 0.25 * box + 0.1 * landmarks`` (its λ1 = 0.25, λ2 = 0.1, plus
a mesh term that is out of scope). Both are a ``LossWeights`` away.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from facepipe.train.matching import MatchConfig, MatchedTargets, match


@dataclass(frozen=True)
class LossWeights:
    box: float = 2.0
    classification: float = 1.0
    landmarks: float = 1.0


PAPER_LOSS_WEIGHTS = LossWeights(box=0.25, classification=1.0, landmarks=0.1)


@dataclass(frozen=True)
class LossConfig:
    match: MatchConfig = field(default_factory=MatchConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    negatives_per_positive: int = 7  # OHEM ratio (reference 7; the paper says at least 3:1)


@dataclass
class LossParts:
    total: torch.Tensor
    box: torch.Tensor
    classification: torch.Tensor
    landmarks: torch.Tensor
    num_positives: int
    num_negatives: int

    def as_floats(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_box": float(self.box.detach()),
            "loss_cls": float(self.classification.detach()),
            "loss_landm": float(self.landmarks.detach()),
            "num_pos": self.num_positives,
            "num_neg": self.num_negatives,
        }


def hard_negative_mask(background_loss: torch.Tensor, positives: torch.Tensor, ratio: int) -> torch.Tensor:
    """Per image, keep the ``ratio * #positives`` background priors with the highest loss.

    ``background_loss`` ``(B, P)`` is the classification loss of each prior taken as background;
    ``positives`` ``(B, P)`` bool. The count is clamped at the number of background priors, so an image with
    no positives contributes no negatives (as in the reference).
    """
    loss = background_loss.detach().clone()
    loss[positives] = -torch.inf  # positives never rank as hard negatives
    num_pos = positives.sum(dim=1, keepdim=True)
    num_background = positives.shape[1] - num_pos
    num_neg = torch.minimum(ratio * num_pos, num_background)
    order = loss.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)
    return (rank < num_neg) & ~positives


def match_batch(
    targets: list[torch.Tensor], priors: torch.Tensor, config: MatchConfig
) -> MatchedTargets:
    """Match each image's ``(G, 15)`` target rows (box 4, landmarks 10, label 1; normalised) to the priors."""
    matched = [match(t[:, :4], t[:, 14], t[:, 4:14], priors, config) for t in targets]
    return MatchedTargets(
        boxes=torch.stack([m.boxes for m in matched]),
        landmarks=torch.stack([m.landmarks for m in matched]),
        labels=torch.stack([m.labels for m in matched]),
    )


def multibox_loss(
    box_pred: torch.Tensor,
    class_logits: torch.Tensor,
    landmark_pred: torch.Tensor,
    targets: list[torch.Tensor],
    priors: torch.Tensor,
    config: LossConfig = LossConfig(),
) -> LossParts:
    """Loss of raw network outputs ``(B, P, 4)``, ``(B, P, 2)`` logits, ``(B, P, 10)`` against ``targets``.

    Box and classification losses are summed and divided by the number of positive priors; the landmark loss
    by the number of positives whose face has landmarks (label +1).
    """
    box_pred, class_logits, landmark_pred = box_pred.float(), class_logits.float(), landmark_pred.float()
    priors = priors.to(box_pred.device)
    with torch.no_grad():
        matched = match_batch([t.to(box_pred.device) for t in targets], priors, config.match)
    positives = matched.labels != 0
    with_landmarks = matched.labels > 0
    num_pos = int(positives.sum())
    num_pos_landmarks = int(with_landmarks.sum())

    loss_landmarks = F.smooth_l1_loss(landmark_pred[with_landmarks], matched.landmarks[with_landmarks], reduction="sum")
    loss_box = F.smooth_l1_loss(box_pred[positives], matched.boxes[positives], reduction="sum")

    class_targets = positives.long()
    background_loss = torch.logsumexp(class_logits, dim=2) - class_logits[..., 0]
    negatives = hard_negative_mask(background_loss, positives, config.negatives_per_positive)
    selected = positives | negatives
    loss_cls = F.cross_entropy(class_logits[selected], class_targets[selected], reduction="sum")

    normaliser = max(num_pos, 1)
    loss_box = loss_box / normaliser
    loss_cls = loss_cls / normaliser
    loss_landmarks = loss_landmarks / max(num_pos_landmarks, 1)
    weights = config.weights
    total = weights.box * loss_box + weights.classification * loss_cls + weights.landmarks * loss_landmarks
    return LossParts(total, loss_box, loss_cls, loss_landmarks, num_pos, int(negatives.sum()))
