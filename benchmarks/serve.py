"""Server throughput and latency vs the engine's own best, with batching on and off.

For each model and each engine instance count (runs in flight at once; the CPU cores are divided
among them): the engine alone (no gRPC, no decoding; best batch size), then reid-serve with
1, 4, 16 and 64 concurrent clients each sending 1 and 8 crops per call, batching on and off, and
(batching on) 16 and 64 EmbedStream callers sending each of those crop counts per message.
Every "x engine" ratio divides by the best engine figure over all instance counts, so a server
configuration only looks good if it beats the engine's best configuration, not just its own.
"x paired" divides by that same best configuration re-measured (--check-seconds) just before and
just after the row, which cancels the drift of a shared machine's speed within a pass.
Each server runs with --max-batch-size set to its instance count's best engine batch size (on a
CPU, ONNX Runtime is often slower per image at large batches), as an operator would tune it, or
to the benchmark's own --max-batch-size.
Every server row also lists the cores each server stage and the load generator used (and the
machine's idle ones), and the inference threads' (with ONNX Runtime's own pool) images per
core-second against the engine alone's: when that is about 1.00x, the server's shortfall is the
CPU share the other stages take, not slower inference.
On a GPU (--device cuda: ONNX Runtime's CUDA provider, for the engine alone and the servers; use
--instances 1) the figure to read is batching on against off at 16 and 64 clients x 1 crop.
Usage: python benchmarks/serve.py MODEL.onnx [MODEL2.onnx ...] [--seconds 6] [--instances 1 2 3]
       [--clients 1 4 16 64] [--crops 1 8] [--batching on off] [--max-batch-size B] [--repeat N]
       [--check-seconds 2] [--images DIR] [--raw | --frames] [--device cpu|cuda] [--pixel-mean ... --pixel-std ...]
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from loadgen import fmt, load_images, run_load, start_server, stop_server
from serving.engines import ModelFileError, ModelMetadata, open_engine


def engine_rate(engine, batch: int, instances: int, seconds: float) -> tuple[float, float]:
    """(images/s, images per CPU-second) of ``engine`` alone, ``instances`` runs of ``batch`` in flight."""
    md = engine.metadata
    x = np.random.default_rng(0).random((batch, 3, md.input_height, md.input_width), dtype=np.float32)
    engine.run(x)
    counts = [0] * instances
    cpu_start = time.process_time()
    start = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - start < seconds:
            engine.run(x)
            counts[i] += batch

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(instances)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start), sum(counts) / (time.process_time() - cpu_start)


def engine_best(path: str, device: str, fallback, instances: int, batches=(1, 8, 16, 32, 64),
                seconds: float = 3.0) -> tuple[object, int, float, float]:
    """(engine, batch, images/s, images per CPU-second) at the best batch size of the engine alone
    with ``instances`` runs in flight, as reid-serve would configure it."""
    engine = open_engine(path, device, fallback, instances=instances)
    best = (0, 0.0, 0.0)
    for b in batches:
        ips, per_core = engine_rate(engine, b, instances, seconds)
        print(f"  engine alone, {instances} instance(s), batch {b:2d}: {ips:8.1f} img/s, {per_core:6.1f} per core-second")
        best = max(best, (b, ips, per_core), key=lambda t: t[1])
    return (engine, *best)


class PairedEngine:
    """The engine's best configuration, re-measured for ``seconds`` before the first server row
    and after every row. Each row is divided by the mean of the checks on either side of it, so a
    machine that speeds up or slows down during a pass moves the numerator and the denominator
    together (on a shared VM one configuration's engine figure drifts by up to 25 % in a pass)."""

    def __init__(self, engine, batch: int, instances: int, seconds: float):
        self.engine, self.batch, self.instances, self.seconds = engine, batch, instances, seconds
        self.checks: list[float] = []

    def check(self) -> None:
        self.checks.append(engine_rate(self.engine, self.batch, self.instances, self.seconds)[0])

    def around_last_row(self) -> float:
        """Images/s of the engine around the row just run: the mean of the checks before and after it."""
        return (self.checks[-2] + self.checks[-1]) / 2


def measure(model: str, args, extra: list[str], fallback) -> dict[tuple, tuple[float, float]]:
    """One pass: the engine alone, then every server configuration; returns each row's ratio to
    this pass's best engine figure and to the engine checked on either side of the row, keyed by
    (instances, batching, clients, crops, stream)."""
    engine = {n: engine_best(model, args.device, fallback, n, seconds=args.engine_seconds) for n in args.instances}
    best_n = max(engine, key=lambda n: engine[n][2])
    best = engine[best_n][2]
    for n, (_, b, ips, _) in engine.items():
        print(f"  engine best, {n} instance(s): {ips:.1f} img/s at batch {b}")
    print(f"  engine best overall: {best:.1f} img/s ({best_n} instance(s)); ratios below divide by it, and "
          f"(paired) by the same configuration re-measured for {args.check_seconds:g} s before and after each row")
    paired = PairedEngine(engine[best_n][0], engine[best_n][1], best_n, args.check_seconds)
    paired.check()
    ratios = {}
    for n in args.instances:
        max_batch = args.max_batch_size or engine[n][1]
        for batching in args.batching:
            proc, target = start_server(model, *extra, "--instances", str(n), "--max-batch-size", str(max_batch),
                                        *([] if batching else ["--no-batching"]))
            print(f"  server, {n} instance(s), max batch {max_batch}, batching {'on' if batching else 'off'}:")
            try:
                loads = [(clients, crops, False) for crops in args.crops for clients in args.clients]
                if batching:
                    loads += [(clients, crops, True) for crops in args.crops for clients in args.clients if clients >= 16]
                for clients, crops, stream in loads:
                    r = run_load(target, clients, crops, args.seconds, timeout=120, stream=stream, server_pid=proc.pid,
                                 pool=args.pool, raw=args.raw, frame=args.frames)
                    paired.check()
                    around = paired.around_last_row()
                    inference = r["cores"].get("inference", 0.0) + r["cores"].get("runtime", 0.0)
                    per_core = r["images_per_s"] / inference / engine[n][3] if inference else float("nan")
                    ratios[(n, batching, clients, crops, stream)] = (r["images_per_s"] / best, r["images_per_s"] / around)
                    print(f"    {fmt(r)}  ({r['images_per_s'] / best:.2f}x engine, {r['images_per_s'] / around:.2f}x "
                          f"paired; inference at {per_core:.2f}x the engine's images per core-second)")
            finally:
                stop_server(proc)
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="+")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16, 64])
    p.add_argument("--crops", type=int, nargs="*", default=[1, 8])
    p.add_argument("--instances", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--batching", choices=["on", "off"], nargs="*", default=["on", "off"])
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="every server's max batch (default: each instance count's best engine batch; batch sizes "
                        "within noise of each other can then differ from pass to pass)")
    p.add_argument("--repeat", type=int, default=1,
                   help="passes per model (engine, then every server, again and again), summarized as medians: "
                        "one 6-second row on a shared 2-core machine moves by up to 25 %%")
    p.add_argument("--engine-seconds", type=float, default=3.0, help="seconds of the engine alone at each batch size")
    p.add_argument("--check-seconds", type=float, default=2.0,
                   help="seconds of each engine check between server rows (the paired ratio's denominator)")
    p.add_argument("--images", metavar="DIR",
                   help="send real crops from DIR (JPEG/PNG, the first 1024 by name; each client its own) instead "
                        "of synthetic 64x128 noise JPEGs")
    p.add_argument("--raw", action="store_true",
                   help="send the crops as raw RGB pixels (decoded once by the benchmark) instead of encoded: "
                        "what the server costs when it has no decoding to do")
    p.add_argument("--frames", action="store_true",
                   help="send each call's crops as boxes in one 1920x1080 JPEG frame, cropped by the server (what a "
                        "pipeline that sends whole frames costs the server)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="ONNX Runtime provider for the engine alone and the servers (cuda needs onnxruntime-gpu)")
    p.add_argument("--pixel-mean", type=float, nargs=3)
    p.add_argument("--pixel-std", type=float, nargs=3)
    args = p.parse_args()
    if args.frames and (args.raw or args.images):
        p.error("--frames sends a synthetic frame: it does not combine with --raw or --images")
    args.batching = [b == "on" for b in args.batching]
    args.pool = load_images(args.images) if args.images else None
    extra = ["--device", args.device]
    fallback = None
    if args.pixel_mean:
        extra += ["--pixel-mean", *map(str, args.pixel_mean), "--pixel-std", *map(str, args.pixel_std)]
        fallback = ModelMetadata(256, 128, 0, pixel_mean=args.pixel_mean, pixel_std=args.pixel_std)
    for model in args.models:
        print(f"model {model}")
        passes = []
        for i in range(args.repeat):
            if args.repeat > 1:
                print(f" pass {i + 1} of {args.repeat}")
            try:
                passes.append(measure(model, args, extra, fallback))
            except ModelFileError as exc:  # e.g. --device cuda without onnxruntime-gpu
                raise SystemExit(f"serve.py: {exc}") from None
        if args.repeat > 1:
            print(f" {model}: x engine over {args.repeat} interleaved passes, median (lowest-highest): "
                  f"to each pass's engine best; paired")
            for key in passes[0]:
                n, batching, clients, crops, stream = key
                summary = []
                for which in (0, 1):
                    values = sorted(one[key][which] for one in passes)
                    summary.append(f"{statistics.median(values):.2f} ({values[0]:.2f}-{values[-1]:.2f})")
                print(f"  {n} instance(s), batching {'on ' if batching else 'off'}, {clients:3d} "
                      f"{'streams' if stream else 'clients'} x {crops} crops: {'; '.join(summary)}")


if __name__ == "__main__":
    main()
