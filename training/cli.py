"""``reid``: the TAO-style command line (``reid train -e spec.yaml key.sub=value ...``)."""
from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
from typing import Callable

from training.data.shared_memory import shared_memory_error
from training.errors import STOP_REQUESTED, ReidError, Terminated, missing_torch, os_error_line

log = logging.getLogger("reid")


def _one_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    text = str(exc).strip()
    last = text.splitlines()[-1] if text else type(exc).__name__
    for prefix in ("training.errors.DataError: ", "training.errors.ConfigError: ", "training.errors.ReidError: "):
        last = last.removeprefix(prefix)
    return last


def _terminate(signum, frame) -> None:
    """Raise where the main thread is, and note the request: the training loop raises it again
    before its next batch, in case the first was lost where it landed (a training run once went on
    to its last epoch after SIGTERM)."""
    STOP_REQUESTED.set()
    raise Terminated()


def _stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """How to word a stop, and its exit code (128 + the signal's number, as a shell reports it)."""
    return ("terminated", 128 + signal.SIGTERM) if isinstance(exc, Terminated) else ("interrupted", 128 + signal.SIGINT)


def _out_of_memory(spec, keys: list[str]) -> str:
    """CUDA out of memory, a traceback of allocator figures before: the settings that size the
    memory, as given, and which to lower."""
    from training.config.load import spec_value

    given = ", ".join(f"{key}={spec_value(spec, key)}" for key in keys)
    return (f"out of GPU memory with {given}: lower {' or '.join(k for k in keys if 'batch' in k)}"
            + (", or set train.mixed_precision=True (float16 activations)"
               if "train.mixed_precision" in keys and not spec.train.mixed_precision else ""))


def _resume_after_fix(spec) -> str:
    """How a run that failed midway goes on once the cause is fixed: from its last checkpoint, in
    ``resume_hint``'s words (nothing where no checkpoint was written)."""
    from pathlib import Path

    from training.checkpoint import latest_checkpoint
    from training.engine import resume_hint

    out_dir = Path(spec.results_dir) / "train"
    return f"; once fixed, {resume_hint(out_dir)}" if latest_checkpoint(out_dir) else ""


def _cmd_train(args) -> int:
    from pathlib import Path

    import torch

    from training.config import load_spec
    from training.engine import launcher_rank, resume_hint, train

    spec = load_spec(args.experiment_spec, args.overrides)
    try:
        ckpt = train(spec)
    except torch.OutOfMemoryError:  # at the first batch, or in a validation after checkpoints were written
        raise ReidError(_out_of_memory(spec, ["dataset.batch_size", "dataset.val_batch_size", "model.input_height",
                                              "model.input_width", "train.mixed_precision"])
                        + _resume_after_fix(spec)) from None
    except RuntimeError as exc:
        error = shared_memory_error(exc)
        if error is None:
            raise
        raise ReidError(f"{error}{_resume_after_fix(spec)}") from None
    except KeyboardInterrupt as exc:  # the epochs since the last checkpoint are lost: say where to go on from
        word, code = _stopped(exc)
        if launcher_rank() == 0:  # under torchrun every rank is stopped: one line says where to go on from
            print(f"reid train: {word}; {resume_hint(Path(spec.results_dir) / 'train')}", file=sys.stderr)
        return code
    except OSError as exc:  # a full disk at a checkpoint: once fixed, go on from the last one written
        log.debug("train failed", exc_info=True)
        raise ReidError(f"{os_error_line(exc)}{_resume_after_fix(spec)}") from None
    if ckpt:
        print(f"checkpoint: {ckpt}")
    return 0


def _cmd_evaluate(args) -> int:
    import torch

    from training.config import load_spec
    from training.evaluate import format_report, run_evaluate

    spec = load_spec(args.experiment_spec, args.overrides)
    try:
        print(format_report(run_evaluate(spec)))
    except torch.OutOfMemoryError:
        raise ReidError(_out_of_memory(spec, ["evaluate.batch_size", "dataset.val_batch_size"])) from None
    return 0


def _cmd_inference(args) -> int:
    import torch

    from training.config import load_spec
    from training.inference import run_inference

    spec = load_spec(args.experiment_spec, args.overrides)
    try:
        print(f"wrote {run_inference(spec)}")
    except torch.OutOfMemoryError:
        raise ReidError(_out_of_memory(spec, ["inference.batch_size", "dataset.val_batch_size"])) from None
    return 0


def _cmd_export(args) -> int:
    from pathlib import Path

    from export.errors import ExportError
    from export.pipeline import run_pipeline
    from training.checkpoint import model_required
    from training.config import load_spec

    spec = load_spec(args.experiment_spec, args.overrides)
    x = spec.export
    if not x.checkpoint:
        raise model_required("export.checkpoint", "a .pth training checkpoint", spec.results_dir)
    if "export.gpu_id" in spec.given_keys:  # TAO's key; set on purpose, it deserves a word
        log.warning("export.gpu_id=%d is not used: the ONNX export runs on the CPU (a TensorRT engine is built on "
                    "the GPU reid-export --engine runs on)", x.gpu_id)
    onnx_path = Path(x.onnx_file) if x.onnx_file else Path(x.checkpoint).with_suffix(".onnx")
    try:
        stages = run_pipeline(Path(x.checkpoint), onnx_path)
    except ExportError as exc:
        raise ReidError(str(exc)) from None
    print(f"onnx: {stages[0].output}")
    return 0


def _cmd_spec(args) -> int:
    from training.config import load_spec
    from training.config.dump import spec_yaml

    print(spec_yaml(load_spec(args.experiment_spec, args.overrides)), end="")
    return 0


def _cmd_make_synthetic(args) -> int:
    from training.data.synthetic import make_synthetic
    from training.progress import progress

    try:
        counts = make_synthetic(
            args.out_dir, args.identities, args.cameras, args.images_per_identity, args.seed, args.height, args.width,
            progress=lambda it: progress(it, desc="identities", unit="id"),
        )
    except ValueError as exc:
        raise ReidError(str(exc)) from None
    for split, n in counts.items():
        print(f"{args.out_dir}/{split}: {n} images")
    return 0


def _spec_command(sub, name: str, help_text: str, func: Callable) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("-e", "--experiment_spec", help="YAML spec file (TAO layout)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="spec overrides, e.g. train.num_epochs=5")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description="Person re-identification: train, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.metadata.version('reid')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _spec_command(sub, "train", "Train a ReID model from a spec.", _cmd_train)
    _spec_command(sub, "evaluate", "mAP/CMC of a checkpoint, .onnx, .engine or embeddings file, with plots.", _cmd_evaluate)
    _spec_command(sub, "export", "Export a checkpoint to ONNX with a parity check (TAO form of reid-export).", _cmd_export)
    _spec_command(sub, "inference", "Embed every query and gallery image (JSON or .npz by extension).", _cmd_inference)
    _spec_command(sub, "spec", "Print the spec after the file and overrides, every key: those set active, the others "
                  "commented out at their defaults (what a run will use; a start for a spec file).", _cmd_spec)
    p = sub.add_parser("make-synthetic", help="Write a small synthetic dataset in Market-1501 layout.")
    p.add_argument("out_dir")
    p.add_argument("--identities", type=int, default=40, help="number of people (half train, half test)")
    p.add_argument("--cameras", type=int, default=2)
    p.add_argument("--images-per-identity", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.set_defaults(func=_cmd_make_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    STOP_REQUESTED.clear()  # a stop asked of an earlier command in this process is not this one's
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except ReidError as exc:
        print(f"reid {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # results_dir not writable, disk full, ...: the path and the reason, not a traceback
        log.debug("%s failed", args.command, exc_info=True)
        print(f"reid {args.command}: error: {os_error_line(exc)} (-v shows where)", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # evaluate's and inference's loaders (train says where to resume itself)
        error = shared_memory_error(exc)
        if error is None:
            raise
        print(f"reid {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        word, code = _stopped(exc)
        print(f"reid {args.command}: {word}", file=sys.stderr)
        return code
    except ModuleNotFoundError as exc:  # train, evaluate, inference, export where only reid-serve's install is
        line = missing_torch(exc, "this command")
        if line is None:
            raise
        print(f"reid {args.command}: error: {line}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
