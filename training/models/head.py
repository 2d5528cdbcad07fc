"""ReID head: optional projection, BNNeck and identity classifier (Luo et al., "Bag of Tricks", 2019)."""
from __future__ import annotations

import torch
from torch import nn


class ReIdHead(nn.Module):
    """Pooled features -> (logits, metric feature) in training, the embedding in eval mode.

    The triplet/center losses use the feature before the BN neck and the ID loss the logits after
    it; ``neck_feat`` picks which of the two the deployed embedding is.
    """

    def __init__(self, in_dim: int, feat_dim: int, num_classes: int, neck: str = "bnneck", neck_feat: str = "after"):
        super().__init__()
        self.proj = nn.Linear(in_dim, feat_dim) if feat_dim != in_dim else nn.Identity()
        self.neck_feat = neck_feat
        self.bnneck = None
        if neck == "bnneck":
            self.bnneck = nn.BatchNorm1d(feat_dim)
            self.bnneck.bias.requires_grad_(False)  # no shift, as in the BNNeck paper
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, pooled: torch.Tensor):
        feat = self.proj(pooled)
        neck_out = self.bnneck(feat) if self.bnneck is not None else feat
        if self.training:
            return self.classifier(neck_out), feat
        return neck_out if self.neck_feat == "after" else feat
