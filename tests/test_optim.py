"""Learning-rate schedule shape and parameter groups."""
from __future__ import annotations

import pytest
from torch import nn

from training.optim import lr_factor, param_groups


def test_linear_warmup_then_steps():
    f = [lr_factor(e, [4, 6], 0.1, 2, 0.01, "linear") for e in range(8)]
    assert f[0] == pytest.approx(0.01)
    assert f[1] == pytest.approx(0.505)
    assert f[2:4] == [1.0, 1.0]
    assert f[4] == pytest.approx(0.1) and f[5] == pytest.approx(0.1)
    assert f[6] == pytest.approx(0.01) and f[7] == pytest.approx(0.01)


def test_cosine_warmup_rises_monotonically_from_factor():
    f = [lr_factor(e, [100], 0.1, 10, 0.01, "cosine") for e in range(11)]
    assert f[0] == pytest.approx(0.01)
    assert f[5] == pytest.approx(0.01 + 0.99 * 0.5)
    assert all(a < b for a, b in zip(f, f[1:]))
    assert f[10] == 1.0
    # cosine starts slower than linear
    assert f[1] < lr_factor(1, [100], 0.1, 10, 0.01, "linear")


def test_param_groups_bias_and_classifier():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(2, 2))
    model.add_module("classifier", nn.Linear(2, 3))
    groups = {g["name"]: g for g in param_groups(model, 0.1, 1e-4, 2.0, 0.0, large_fc_lr=True)}
    assert groups["body.weight"]["lr"] == pytest.approx(0.1) and groups["body.weight"]["weight_decay"] == 1e-4
    assert groups["body.bias"]["lr"] == pytest.approx(0.2) and groups["body.bias"]["weight_decay"] == 0.0
    assert groups["classifier.weight"]["lr"] == pytest.approx(0.2)
