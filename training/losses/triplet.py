"""Batch-hard triplet loss (Hermans et al., "In Defense of the Triplet Loss", 2017)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1, keepdim=True)
    d = sq + sq.t() - 2 * x @ x.t()
    return d.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """For each anchor: hardest positive vs hardest negative in the batch.

    ``margin=None`` selects the soft margin ``log(1 + exp(d_ap - d_an))`` (TAO's ``no_margin``);
    otherwise the hinge ``max(0, d_ap - d_an + margin)``.
    """

    def __init__(self, margin: float | None = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = pairwise_euclidean(feats.float())
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        d_ap = dist.masked_fill(~same, float("-inf")).max(1).values
        d_an = dist.masked_fill(same, float("inf")).min(1).values
        if self.margin is None:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()
