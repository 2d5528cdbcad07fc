"""Each loss against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from training.losses import CenterLoss, CrossEntropyLabelSmooth, LossWeights, ReIdLoss, TripletLoss


def test_cross_entropy_plain_and_smoothed():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    target = torch.tensor([0])
    log_z = math.log(math.exp(2) + 2)
    assert CrossEntropyLabelSmooth(3, 0.0)(logits, target).item() == pytest.approx(log_z - 2, abs=1e-6)
    # eps=0.3: target weights (0.8, 0.1, 0.1)
    expected = 0.8 * (log_z - 2) + 0.1 * log_z + 0.1 * log_z
    assert CrossEntropyLabelSmooth(3, 0.3)(logits, target).item() == pytest.approx(expected, abs=1e-6)


def _triplet_batch():
    # 1-D points: ids 0 at {0, 1}, ids 1 at {3, 7}
    feats = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # hardest positive / negative distances per anchor:
    # a=0: ap 1, an 3 ; a=1: ap 1, an 2 ; a=3: ap 4, an 2 ; a=7: ap 4, an 6
    return feats, labels, [(1, 3), (1, 2), (4, 2), (4, 6)]


def test_triplet_hard_margin():
    feats, labels, pairs = _triplet_batch()
    expected = sum(max(0.0, ap - an + 0.3) for ap, an in pairs) / 4
    assert TripletLoss(0.3)(feats, labels).item() == pytest.approx(expected, abs=1e-5)


def test_triplet_soft_margin():
    feats, labels, pairs = _triplet_batch()
    expected = sum(math.log1p(math.exp(ap - an)) for ap, an in pairs) / 4
    assert TripletLoss(None)(feats, labels).item() == pytest.approx(expected, abs=1e-5)


def test_center_loss():
    loss = CenterLoss(2, 2)
    with torch.no_grad():
        loss.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    feats = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    # squared distances: 1 and 4
    assert loss(feats, torch.tensor([0, 1])).item() == pytest.approx(2.5)


def test_composition_follows_weights():
    torch.manual_seed(0)
    logits, feats, labels = torch.randn(4, 3), torch.randn(4, 5), torch.tensor([0, 0, 1, 1])
    full = ReIdLoss(LossWeights(use_center=True, center_weight=0.5), 3, 5)
    total, parts = full(logits, feats, labels)
    assert set(parts) == {"id", "triplet", "center"}
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-6)
    expected_center = 0.5 * full.center(feats, labels).item()
    assert parts["center"] == pytest.approx(expected_center, rel=1e-6)
    only_id = ReIdLoss(LossWeights(use_triplet=False), 3, 5)
    assert set(only_id(logits, feats, labels)[1]) == {"id"}


@pytest.mark.parametrize("overrides, expected", [
    ([], "id + triplet(margin 0.3)"),
    (["dataset.sampler=softmax"], "id"),
    (["dataset.sampler=triplet"], "triplet(margin 0.3)"),
    (["model.metric_loss_type=center", "model.with_center_loss=True"], "id + 0.0005 * center"),
    (["dataset.sampler=triplet", "model.metric_loss_type=triplet_center", "model.with_center_loss=True",
      "model.no_margin=True"], "triplet(soft margin) + 0.0005 * center"),
    (["model.label_smooth=True", "train.optim.triplet_loss_margin=0.5"], "id(label smoothing 0.1) + triplet(margin 0.5)"),
])
def test_the_spec_selects_the_losses_its_keys_document(overrides, expected):
    """docs/training.md's table: ``dataset.sampler`` picks the ID and/or metric parts,
    ``model.metric_loss_type`` which metric parts, ``no_margin`` the soft margin. The description is
    what the training log shows."""
    from training.config.load import build_spec
    from training.losses.compose import loss_from_spec

    assert loss_from_spec(build_spec({}, overrides)).describe() == expected
