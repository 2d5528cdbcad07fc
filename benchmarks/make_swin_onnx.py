"""Write a randomly initialized full-size Swin-Tiny (256x128, 768-d) checkpoint and its ONNX export,
for serving benchmarks on a model of realistic cost. Usage: python benchmarks/make_swin_onnx.py OUT_DIR"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx import export_onnx  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.models import ModelArgs, build_model  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench_models")
args = ModelArgs("swin_tiny_patch4_window7_224", num_classes=751, input_height=256, input_width=128, feat_dim=768)
ckpt = save_checkpoint(out / "swin_tiny.pth", {"epoch": 0, "model_args": args.to_dict(),
                                              "model_state": build_model(args).state_dict(), "spec": {}})
print(export_onnx(ckpt, out / "swin_tiny.onnx")["onnx"])
