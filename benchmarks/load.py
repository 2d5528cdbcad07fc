"""Overload and soak on loopback: ramp clients past capacity, hold 2x overload, check recovery.

Reports throughput, latency percentiles, errors by status code, and the server's RSS at the start
and end of the soak. Everything is bounded in time and stops by itself.
Usage: python benchmarks/load.py MODEL.onnx [--soak-seconds 600] [--step-seconds 5] [--images DIR]
"""
from __future__ import annotations

import argparse
import threading

from loadgen import fmt, load_images, rss_mib, run_load, start_server, stop_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model")
    p.add_argument("--step-seconds", type=float, default=5.0)
    p.add_argument("--soak-seconds", type=float, default=60.0)
    p.add_argument("--crops", type=int, default=4)
    p.add_argument("--queue-capacity", type=int, default=256)
    p.add_argument("--timeout", type=float, default=2.0, help="client deadline per call")
    p.add_argument("--images", metavar="DIR", help="send real crops from DIR instead of synthetic JPEGs")
    p.add_argument("--pixel-mean", type=float, nargs=3, help="for a model without reid metadata")
    p.add_argument("--pixel-std", type=float, nargs=3)
    args = p.parse_args()
    pool = load_images(args.images) if args.images else None
    extra = ["--pixel-mean", *map(str, args.pixel_mean), "--pixel-std", *map(str, args.pixel_std)] if args.pixel_mean else []
    per_request = min(256, args.queue_capacity)  # the server refuses a request limit above its queue capacity
    proc, target = start_server(args.model, "--queue-capacity", str(args.queue_capacity),
                                "--max-images-per-request", str(per_request), *extra)
    try:
        print(f"server RSS after warm-up: {rss_mib(proc.pid):.0f} MiB")
        print("ramp:")
        capacity = None
        for clients in (1, 2, 4, 8, 16, 32, 64, 128):
            r = run_load(target, clients, args.crops, args.step_seconds, args.timeout, pool=pool)
            print(f"  {fmt(r)}")
            capacity = max(capacity or 0.0, r["images_per_s"])
        base = run_load(target, 8, args.crops, args.step_seconds, args.timeout, pool=pool)
        overload_clients = 128
        print(f"capacity about {capacity:.1f} img/s; soak at {overload_clients} clients for {args.soak_seconds:.0f} s "
              f"(offered load well above 2x capacity; deadline {args.timeout} s)")
        rss_start = rss_mib(proc.pid)
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(args.soak_seconds / 10):
                samples.append(rss_mib(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        soak = run_load(target, overload_clients, args.crops, args.soak_seconds, args.timeout, pool=pool)
        stop.set()
        rss_end = rss_mib(proc.pid)
        print(f"  soak: {fmt(soak)}")
        print(f"  server RSS start {rss_start:.0f} MiB, end {rss_end:.0f} MiB; every tenth of the soak: "
              + ", ".join(f"{v:.0f}" for v in samples))
        unexpected = {k: v for k, v in soak["codes"].items() if k not in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")}
        print(f"  error codes other than RESOURCE_EXHAUSTED/DEADLINE_EXCEEDED: {unexpected or 'none'}")
        after = run_load(target, 8, args.crops, args.step_seconds, args.timeout, pool=pool)
        print(f"recovery at 8 clients: before {base['images_per_s']:.1f} img/s, after {after['images_per_s']:.1f} img/s "
              f"({after['images_per_s'] / base['images_per_s']:.2f}x)")
        print(f"server alive after the soak: {proc.poll() is None}")
    finally:
        print(f"server exit code after SIGTERM: {stop_server(proc)}")


if __name__ == "__main__":
    main()
