"""Identity (classification) loss with optional label smoothing (Szegedy et al., 2016)."""
from __future__ import annotations

import torch
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against targets ``(1 - eps) * onehot + eps / num_classes``; eps=0 is plain CE."""

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=1)
        onehot = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1.0)
        smoothed = (1 - self.epsilon) * onehot + self.epsilon / self.num_classes
        return (-smoothed * log_probs).sum(dim=1).mean()
