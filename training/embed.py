"""Embed image records with a torch model: shared by validation, ``reid evaluate`` and ``reid inference``."""
from __future__ import annotations

import numpy as np
import torch

from training.checkpoint import load_checkpoint
from training.data.shared_memory import check_shared_memory
from training.data.transforms import ImageDataset, build_eval_transform
from training.models import ModelArgs, build_model
from training.models.build import ReIdModel
from training.progress import progress


def model_from_checkpoint(path: str) -> tuple[ReIdModel, dict]:
    """Rebuild the exact trained model (eval mode) from a checkpoint; returns it and the checkpoint."""
    ckpt = load_checkpoint(path)
    model = build_model(ModelArgs.from_dict(ckpt["model_args"]))
    model.load_state_dict(ckpt["model_state"])
    return model.eval(), ckpt


def nonfinite_rows(features: np.ndarray) -> int:
    """How many embeddings hold a NaN or an infinity: a broken model or an FP16 export that
    overflows gives them, and no distance to them means anything."""
    return int((~np.isfinite(features)).any(axis=1).sum())


@torch.no_grad()
def embed_records(
    model: ReIdModel, records, device: torch.device, batch_size: int = 128, num_workers: int = 0, desc: str | None = None
) -> np.ndarray:
    """Eval-mode embeddings (float32, N x D) of ``records`` in order."""
    args = model.args
    check_shared_memory(batch_size, args.input_height, args.input_width, num_workers)
    loader = torch.utils.data.DataLoader(
        ImageDataset(records, build_eval_transform(args.input_height, args.input_width)),
        batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    out = []
    with progress(loader, desc=desc or "", disable=desc is None, unit="batch", leave=False) as bar:  # cleared however the loop ends
        for images, _, _ in bar:
            out.append(model(images.to(device, non_blocking=True)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, args.feat_dim), dtype=np.float32)
