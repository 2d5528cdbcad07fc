"""Which torch device a job runs on: the CUDA device a spec key names, where CUDA is available."""
from __future__ import annotations

import os

import torch

from training.errors import ConfigError


def cuda_or_cpu(index: int, key: str) -> torch.device:
    """CUDA device ``index`` where CUDA is available, else the CPU. An index the machine does not
    have is refused naming ``key``: it failed later inside CUDA as "invalid device ordinal"."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        renumbered = f"; CUDA_VISIBLE_DEVICES={visible} numbers the visible ones from 0" if visible else ""
        raise ConfigError(f"{key} names CUDA device {index}, but this machine has {count} (0..{count - 1}){renumbered}")
    return torch.device("cuda", index)
