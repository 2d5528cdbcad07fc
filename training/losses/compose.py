"""Which losses a run uses, and their weighted sum.

The sampler decides the family as in the ReID strong baseline: ``softmax`` trains the ID loss only,
``triplet`` the metric loss only, ``softmax_triplet`` both; ``metric_loss_type`` picks triplet, center
or both as the metric part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.losses.center import CenterLoss
from training.losses.identity import CrossEntropyLabelSmooth
from training.losses.triplet import TripletLoss

LABEL_SMOOTH_EPSILON = 0.1


@dataclass
class LossWeights:
    use_id: bool = True
    use_triplet: bool = True
    use_center: bool = False
    label_smooth: bool = False
    triplet_margin: float | None = 0.3
    center_weight: float = 0.0005

    def describe(self) -> str:
        parts = []
        if self.use_id:
            parts.append("id" + ("(label smoothing 0.1)" if self.label_smooth else ""))
        if self.use_triplet:
            parts.append("triplet(" + ("soft margin" if self.triplet_margin is None else f"margin {self.triplet_margin}") + ")")
        if self.use_center:
            parts.append(f"{self.center_weight} * center")
        return " + ".join(parts)


class ReIdLoss(nn.Module):
    """Returns the total and a dict of its parts (for logs)."""

    def __init__(self, weights: LossWeights, num_classes: int, feat_dim: int):
        super().__init__()
        if not (weights.use_id or weights.use_triplet or weights.use_center):
            raise ValueError("no loss selected")
        self.weights = weights
        self.id_loss = CrossEntropyLabelSmooth(num_classes, LABEL_SMOOTH_EPSILON if weights.label_smooth else 0.0)
        self.triplet = TripletLoss(weights.triplet_margin)
        self.center = CenterLoss(num_classes, feat_dim) if weights.use_center else None

    def forward(self, logits: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor):
        parts = {}
        if self.weights.use_id:
            parts["id"] = self.id_loss(logits, labels)
        if self.weights.use_triplet:
            parts["triplet"] = self.triplet(feats, labels)
        if self.center is not None:
            parts["center"] = self.weights.center_weight * self.center(feats, labels)
        return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


def loss_from_spec(spec) -> LossWeights:
    m, s = spec.model, spec.dataset.sampler
    return LossWeights(
        use_id=s in ("softmax", "softmax_triplet"),
        use_triplet=s in ("triplet", "softmax_triplet") and m.metric_loss_type in ("triplet", "triplet_center"),
        use_center=m.with_center_loss,
        label_smooth=m.label_smooth,
        triplet_margin=None if m.no_margin else spec.train.optim.triplet_loss_margin,
        center_weight=spec.train.optim.center_loss_weight,
    )
