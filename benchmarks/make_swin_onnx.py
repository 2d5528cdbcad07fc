"""Write a randomly initialized full-size Swin-Tiny (256x128, 768-d) checkpoint and its ONNX export,
for serving benchmarks on a model of realistic cost (benchmarks/serve.py OUT_DIR/swin_tiny.onnx).
Random weights: its embeddings mean nothing, only its cost does."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.onnx import export_onnx  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.models import ModelArgs, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", nargs="?", type=Path, default=Path("bench_models"),
                        help="folder for swin_tiny.pth and swin_tiny.onnx (about 110 MB each; default bench_models)")
    out = parser.parse_args().out_dir
    args = ModelArgs("swin_tiny_patch4_window7_224", num_classes=751, input_height=256, input_width=128, feat_dim=768)
    ckpt = save_checkpoint(out / "swin_tiny.pth", {"epoch": 0, "model_args": args.to_dict(),
                                                  "model_state": build_model(args).state_dict(), "spec": {}})
    print(export_onnx(ckpt, out / "swin_tiny.onnx")["onnx"])


if __name__ == "__main__":
    main()
