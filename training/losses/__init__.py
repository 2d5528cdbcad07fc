"""Losses: identity (cross-entropy), batch-hard triplet and center loss, and their composition."""
from training.losses.center import CenterLoss
from training.losses.compose import LossWeights, ReIdLoss, loss_from_spec
from training.losses.identity import CrossEntropyLabelSmooth
from training.losses.triplet import TripletLoss

__all__ = ["CenterLoss", "CrossEntropyLabelSmooth", "LossWeights", "ReIdLoss", "TripletLoss", "loss_from_spec"]
