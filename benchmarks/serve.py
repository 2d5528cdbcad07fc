"""Server throughput and latency vs the engine's own best, with batching on and off.

For each model: the engine alone (no gRPC, no decoding; best batch size), then reid-serve with
1, 4, 16 and 64 concurrent clients each sending 1 and 8 crops per call, batching on and off.
Usage: python benchmarks/serve.py MODEL.onnx [MODEL2.onnx ...] [--seconds 6] [--pixel-mean ... --pixel-std ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from loadgen import fmt, run_load, start_server, stop_server
from serving.engines import ModelMetadata, open_engine


def engine_best(path: str, fallback, batches=(1, 8, 16, 32, 64), seconds: float = 3.0) -> tuple[int, float]:
    engine = open_engine(path, "cpu", fallback)
    md = engine.metadata
    best = (0, 0.0)
    for b in batches:
        x = np.random.default_rng(0).random((b, 3, md.input_height, md.input_width), dtype=np.float32)
        engine.run(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            engine.run(x)
            n += b
        ips = n / (time.perf_counter() - start)
        print(f"  engine alone, batch {b:2d}: {ips:8.1f} img/s")
        best = max(best, (b, ips), key=lambda t: t[1])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16, 64])
    p.add_argument("--crops", type=int, nargs="*", default=[1, 8])
    p.add_argument("--pixel-mean", type=float, nargs=3)
    p.add_argument("--pixel-std", type=float, nargs=3)
    args = p.parse_args()
    extra = []
    fallback = None
    if args.pixel_mean:
        extra = ["--pixel-mean", *map(str, args.pixel_mean), "--pixel-std", *map(str, args.pixel_std)]
        fallback = ModelMetadata(256, 128, 0, pixel_mean=args.pixel_mean, pixel_std=args.pixel_std)
    for model in args.models:
        print(f"model {model}")
        best_batch, best = engine_best(model, fallback)
        print(f"  engine best: {best:.1f} img/s at batch {best_batch}")
        for batching in (True, False):
            proc, target = start_server(model, *extra, *([] if batching else ["--no-batching"]))
            print(f"  server, batching {'on' if batching else 'off'}:")
            try:
                for crops in args.crops:
                    for clients in args.clients:
                        r = run_load(target, clients, crops, args.seconds, timeout=120)
                        print(f"    {fmt(r)}  ({r['images_per_s'] / best:.2f}x engine)")
            finally:
                stop_server(proc)


if __name__ == "__main__":
    main()
