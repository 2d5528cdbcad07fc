"""Optimizers with ReID parameter groups and the warmup + multi-step learning-rate schedule."""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, bias_lr_factor: float, weight_decay_bias: float, large_fc_lr: bool
) -> list[dict]:
    """One group per parameter: biases get ``base_lr * bias_lr_factor`` and ``weight_decay_bias``;
    with ``large_fc_lr`` the classifier learns at twice the base rate."""
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, wd = base_lr, weight_decay
        if name.endswith("bias"):
            lr, wd = base_lr * bias_lr_factor, weight_decay_bias
        if large_fc_lr and "classifier" in name:
            lr = base_lr * 2
        groups.append({"params": [param], "lr": lr, "weight_decay": wd, "initial_lr": lr, "name": name})
    return groups


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    groups = param_groups(
        model, optim_cfg.base_lr, optim_cfg.weight_decay, optim_cfg.bias_lr_factor, optim_cfg.weight_decay_bias, optim_cfg.large_fc_lr
    )
    if optim_cfg.name == "SGD":
        return torch.optim.SGD(groups, lr=optim_cfg.base_lr, momentum=optim_cfg.momentum)
    if optim_cfg.name == "Adam":
        return torch.optim.Adam(groups, lr=optim_cfg.base_lr)
    return torch.optim.AdamW(groups, lr=optim_cfg.base_lr)


def lr_factor(epoch: int, lr_steps: list[int], gamma: float, warmup_epochs: int, warmup_factor: float, warmup_method: str) -> float:
    """Multiplier of each group's initial LR at ``epoch`` (0-based).

    Warmup rises from ``warmup_factor`` to 1 over ``warmup_epochs`` (linearly, or along half a
    cosine); then the rate drops by ``gamma`` at every epoch listed in ``lr_steps``.
    """
    decay = gamma ** sum(1 for step in lr_steps if epoch >= step)
    if epoch >= warmup_epochs:
        return decay
    alpha = epoch / warmup_epochs
    if warmup_method == "linear":
        warm = warmup_factor * (1 - alpha) + alpha
    else:
        warm = warmup_factor + (1 - warmup_factor) * (1 - math.cos(math.pi * alpha)) / 2
    return warm * decay


def warn_of_unreached_schedule(o, num_epochs: int) -> None:
    """A schedule cut short (a 120-epoch spec run for 30 epochs) kept the full rate to the end, or
    never reached it, without a word. ``o``: the spec's ``train.optim``."""
    late = [str(step) for step in o.lr_steps if step >= num_epochs]
    if late:
        which = f"epoch {late[0]} is" if len(late) == 1 else f"epochs {', '.join(late)} are"
        log.warning("train.optim.lr_steps=%s: %s never reached with train.num_epochs=%d (epochs 0..%d run), so the rate "
                    "is not lowered there", o.lr_steps, which, num_epochs, num_epochs - 1)
    if o.warmup_epochs >= num_epochs:
        log.warning("train.optim.warmup_epochs=%d is not shorter than train.num_epochs=%d: the run ends before the "
                    "rate reaches train.optim.base_lr", o.warmup_epochs, num_epochs)


def set_epoch_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
