"""Export figures per backbone: export time, ONNX size, and throughput of torch eager vs ONNX
Runtime FP32 vs FP16 ONNX (CPU) at batch 1/8/32; with TensorRT on a GPU machine, the engine too.

Models are randomly initialized (throughput does not depend on the weights).
Usage: python benchmarks/export.py [--height 256 --width 128] [--backbones ...] [--seconds 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.pipeline import run_pipeline  # noqa: E402
from export.tensorrt import gpu_available  # noqa: E402
from serving.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.models import ModelArgs, available_backbones, build_model  # noqa: E402


def throughput(fn, batch: np.ndarray, seconds: float) -> float:
    fn(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--backbones", nargs="*", default=available_backbones())
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    trt_ok, why = gpu_available()
    print(f"input {args.height}x{args.width}; CPU threads {torch.get_num_threads()}; TensorRT: {'yes' if trt_ok else why}")
    tmp = Path(tempfile.mkdtemp(prefix="export-bench-"))
    for backbone in args.backbones:
        model_args = ModelArgs(backbone, num_classes=751, input_height=args.height, input_width=args.width, feat_dim=768)
        model = build_model(model_args).eval()
        ckpt = save_checkpoint(tmp / f"{backbone}.pth", {"epoch": 0, "model_args": model_args.to_dict(),
                                                          "model_state": model.state_dict(), "spec": {}})
        onnx_path = tmp / f"{backbone}.onnx"
        engine_path = tmp / f"{backbone}.engine" if trt_ok else None
        stages = run_pipeline(ckpt, onnx_path, engine_path, fp16=True, log=lambda *_: None)
        print(f"{backbone}: export {stages[0].seconds:.1f} s, ONNX {onnx_path.stat().st_size / 2**20:.0f} MiB, "
              f"FP16 ONNX {(tmp / f'{backbone}.fp16.onnx').stat().st_size / 2**20:.0f} MiB; "
              f"worst row cosine ONNX {min(stages[0].parity.values()):.6f}, FP16 {min(stages[1].parity.values()):.6f}")
        fp32 = OnnxRuntimeEngine(onnx_path)
        fp16 = OnnxRuntimeEngine(tmp / f"{backbone}.fp16.onnx")
        runners = {"torch eager": lambda b: model(torch.from_numpy(b)), "ORT FP32": fp32.run, "ORT FP16 ONNX": fp16.run}
        if trt_ok:
            from serving.engines.tensorrt import TensorRTEngine

            runners["TensorRT"] = TensorRTEngine(engine_path).run
        for name, fn in runners.items():
            row = []
            for b in args.batches:
                batch = np.random.default_rng(b).random((b, 3, args.height, args.width), dtype=np.float32)
                with torch.no_grad():
                    row.append(f"b{b} {throughput(fn, batch, args.seconds):7.1f}")
            print(f"  {name:14s} img/s: " + "  ".join(row))


if __name__ == "__main__":
    main()
