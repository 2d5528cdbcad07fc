"""``reid-export``: checkpoint -> ONNX -> FP16 ONNX -> TensorRT engine, each stage checked."""
from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

from export.errors import ExportError, warn
from export.fp16 import TOOLS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-export", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('reid')}")
    p.add_argument("--checkpoint", type=Path, help="training checkpoint (.pth); omit to start from an existing --onnx")
    p.add_argument("--onnx", type=Path, required=True, help="ONNX file to write (or to read, without --checkpoint)")
    p.add_argument("--engine", type=Path, help="TensorRT engine to build (GPU machines only)")
    p.add_argument("--fp16", action="store_true", help="also write NAME.fp16.onnx (mixed precision); the engine is built from it")
    p.add_argument("--fp16-tool", choices=TOOLS, help="FP16 converter (default: ort)")
    p.add_argument("--normalize", action="store_true", help="L2-normalize the exported embeddings (recorded in metadata)")
    p.add_argument("--min-batch", type=int, help="smallest batch the engine takes (default 1)")
    p.add_argument("--opt-batch", type=int, help="batch TensorRT tunes the engine for (default 16)")
    p.add_argument("--max-batch", type=int, help="largest batch the engine takes; reid-serve's "
                   "--max-batch-size is capped at it (default 64)")
    p.add_argument("--workspace-gb", type=float, help="TensorRT's workspace memory limit in GiB (default 4)")
    p.add_argument("--timing-cache", type=Path, help="timing cache file reused across builds (default: next to the engine)")
    p.add_argument("--pixel-mean", type=float, nargs=3, help="preprocessing of an ONNX file from another tool")
    p.add_argument("--pixel-std", type=float, nargs=3, help="preprocessing of an ONNX file from another tool")
    p.add_argument("--verify-only", action="store_true", help="re-check existing files against each other; write nothing")
    return p


# Options that shape one stage, with their defaults, and the option without which that stage does not run.
_STAGE_OPTIONS = {"fp16_tool": ("ort", "fp16"), "min_batch": (1, "engine"), "opt_batch": (16, "engine"),
                  "max_batch": (64, "engine"), "workspace_gb": (4.0, "engine"), "timing_cache": (None, "engine")}


def _stage_options(args: argparse.Namespace) -> None:
    """Fill in the stage options' defaults, and say which given ones change nothing because their
    stage does not run (``--max-batch`` without ``--engine`` built no engine, silently)."""
    for name, (default, stage) in _STAGE_OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif not getattr(args, stage):
            warn(f"{flag} ignored: it applies to the --{stage} stage, which was not asked for")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _stage_options(args)
    from export.pipeline import run_pipeline, verify_only

    try:
        if args.verify_only:
            stages = verify_only(args.checkpoint, args.onnx, args.engine, args.fp16)
        else:
            stages = run_pipeline(
                args.checkpoint, args.onnx, args.engine, args.fp16, args.fp16_tool, args.normalize,
                (args.min_batch, args.opt_batch, args.max_batch), args.workspace_gb, args.timing_cache,
                args.pixel_mean, args.pixel_std,
            )
    except ExportError as exc:
        print(f"reid-export: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output folder that cannot be created or written, a full disk
        from training.errors import os_error_line

        print(f"reid-export: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # --checkpoint where only reid-serve's install is (no PyTorch)
        from training.errors import missing_torch

        line = missing_torch(exc, "--checkpoint")
        if line is None:
            raise
        print(f"reid-export: error: {line}; building from an existing --onnx needs no PyTorch", file=sys.stderr)
        return 2
    except Exception as exc:  # a checkpoint/ONNX file that cannot be read
        from training.errors import ReidError

        if isinstance(exc, ReidError):
            print(f"reid-export: error: {exc}", file=sys.stderr)
            return 2
        raise
    print("summary:")
    for s in stages:
        parity = ", ".join(f"batch {n}: {c:.6f}" for n, c in s.parity.items())
        print(f"  {s.name:10s} {s.output}  ({s.seconds:.1f} s; worst row cosine {parity})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
