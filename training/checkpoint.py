"""Training checkpoints: plain tensors and primitives only, so they load with ``weights_only=True``.

A checkpoint holds everything later stages need: the model arguments (to rebuild the model), the
full spec, the train-pid mapping, and the optimizer state and epoch for ``resume``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from training.errors import ReidError

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint``; anything else raises ``ReidError``."""
    path = Path(path)
    if not path.is_file():
        raise ReidError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise ReidError(f"{path} is not a readable checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model_state" not in ckpt:
        raise ReidError(f"{path} is not a reid training checkpoint (no model_args/model_state)")
    return ckpt


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
