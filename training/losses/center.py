"""Center loss (Wen et al., ECCV 2016): pulls each feature towards its identity's learned center."""
from __future__ import annotations

import torch
from torch import nn


class CenterLoss(nn.Module):
    """Mean over the batch of the squared distance between each feature and its class center.

    The centers are parameters updated by their own optimizer (``center_lr``); the trainer rescales
    their gradient by 1 / ``center_loss_weight`` so that weight only affects the network.
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = feats.float() - self.centers[labels]
        return (diff * diff).sum(1).clamp(1e-12, 1e12).mean()
