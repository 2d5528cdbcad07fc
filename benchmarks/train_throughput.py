"""Images/s of one training step per backbone, and of the data loader on its own.

A slow loader shows as loader images/s below the step's. Runs on CUDA (with AMP) when present,
else on the CPU. Example: python benchmarks/train_throughput.py --height 256 --width 128 --batch 32
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from training.data.market1501 import load_train
from training.data.samplers import IdentityBatchSampler
from training.data.synthetic import make_synthetic
from training.data.transforms import ImageDataset, build_train_transform
from training.losses import LossWeights, ReIdLoss
from training.models import ModelArgs, available_backbones, build_model


def step_throughput(backbone: str, device: torch.device, batch: int, height: int, width: int, steps: int, amp: bool) -> float:
    model = build_model(ModelArgs(backbone, num_classes=751, input_height=height, input_width=width, feat_dim=768)).to(device)
    loss = ReIdLoss(LossWeights(triplet_margin=None), 751, 768).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    images = torch.rand(batch, 3, height, width, device=device)
    labels = torch.arange(batch, device=device) // 4

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits, feats = model(images)
        total, _ = loss(logits, feats, labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(opt)
        scaler.update()

    step()  # warm-up (allocations, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def loader_throughput(batch: int, height: int, width: int, workers: int, batches: int) -> float:
    with tempfile.TemporaryDirectory() as root:
        make_synthetic(root, identities=80, cameras=2, images_per_identity=16, seed=0)
        records = load_train(f"{root}/bounding_box_train")
        transform = build_train_transform(height, width, 0.5, 10, 0.5, [0.5, 0.5, 0.5])
        sampler = IdentityBatchSampler([r.pid for r in records], batch, 4)
        loader = torch.utils.data.DataLoader(ImageDataset(records, transform), batch_sampler=sampler, num_workers=workers)
        n, start = 0, time.perf_counter()
        while n < batches * batch:
            for images, _, _ in loader:
                n += images.shape[0]
        return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--backbones", nargs="*", default=available_backbones())
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = device.type == "cuda"
    name = torch.cuda.get_device_name() if amp else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; input {args.height}x{args.width}; batch {args.batch}; AMP {amp}")
    for backbone in args.backbones:
        ips = step_throughput(backbone, device, args.batch, args.height, args.width, args.steps, amp)
        print(f"train step  {backbone:32s} {ips:9.1f} images/s")
    ips = loader_throughput(args.batch, args.height, args.width, args.workers, batches=20)
    print(f"data loader {args.workers} workers{'':22s} {ips:9.1f} images/s")


if __name__ == "__main__":
    main()
