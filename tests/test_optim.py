"""Learning-rate schedule shape and parameter groups."""
from __future__ import annotations

import pytest
from torch import nn

from training.optim import lr_factor, param_groups, warn_of_unreached_schedule


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


def test_a_schedule_longer_than_the_run_is_warned_about(caplog):
    """A 120-epoch spec run for 30 epochs kept the full rate to the end without a word."""
    from training.config.load import build_spec

    o = build_spec({}, []).train.optim  # TAO's lr_steps [40, 70], warmup 10
    warn_of_unreached_schedule(o, 120)
    warn_of_unreached_schedule(o, 71)  # epoch 70 is the 71st: reached
    assert caplog.messages == []
    warn_of_unreached_schedule(o, 50)
    warn_of_unreached_schedule(o, 10)
    assert caplog.messages == [
        "train.optim.lr_steps=[40, 70]: epoch 70 is never reached with train.num_epochs=50 (epochs 0..49 run), so the "
        "rate is not lowered there",
        "train.optim.lr_steps=[40, 70]: epochs 40, 70 are never reached with train.num_epochs=10 (epochs 0..9 run), so the "
        "rate is not lowered there",
        "train.optim.warmup_epochs=10 is not shorter than train.num_epochs=10: the run ends before the rate reaches "
        "train.optim.base_lr"]
    assert lr_factor(49, o.lr_steps, o.gamma, o.warmup_epochs, o.warmup_factor, o.warmup_method) == pytest.approx(0.1)
