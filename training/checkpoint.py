"""Training checkpoints: plain tensors and primitives only, so they load with ``weights_only=True``.

A checkpoint holds everything later stages need: the model arguments (to rebuild the model), the
full spec, the train-pid mapping, and the optimizer state and epoch for ``resume``.
"""
from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from training.errors import ConfigError, ReidError
from training.outputs import replaced_on_success

log = logging.getLogger(__name__)
# Raised by a version that writes what an older one cannot read, which then refuses the file.
FORMAT_VERSION = 1


class _Writes:
    """The file torch.save writes through. Its zip writer turns a failed write (a full disk) into
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...``, which reached
    users as a traceback; the OSError kept here is raised instead."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with replaced_on_success(path) as tmp, open(tmp, "wb") as file:
            out = _Writes(file)
            try:
                torch.save({"format_version": FORMAT_VERSION, **payload}, out)
            except RuntimeError:
                if out.error is None:
                    raise
                raise out.error from None
    except OSError as exc:  # the checkpoint's own name, not the temporary file's (or none)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    return path


def checkpoints_to_come(epoch: int, num_epochs: int, interval: int) -> int:
    """How many checkpoints a run writes after ``epoch``: every ``interval`` epochs, and the last."""
    every = num_epochs // interval - epoch // interval
    return every + (num_epochs % interval != 0 and epoch < num_epochs)


def warn_if_disk_runs_short(written: Path, to_come: int) -> None:
    """Said once the run's first checkpoint is written, when the ones still to come would not fit
    beside it: each holds the weights and the optimizer's state (Swin-Base: about 1 GB), and a run
    that checkpoints every epoch filled the disk tens of epochs in, its later epochs lost."""
    size, free = written.stat().st_size, shutil.disk_usage(written.parent).free
    if to_come * size > free:
        log.warning("the %d checkpoint(s) still to come need about %.1f GiB (%.2f GiB each), but %s has %.1f GiB free: "
                    "free space, raise train.checkpoint_interval, or move older checkpoints away as the run goes; "
                    "a checkpoint that does not fit stops the run (resumable from the last one written)",
                    to_come, to_come * size / 2**30, size / 2**30, written.parent, free / 2**30)


def _written_by_torch_save(path: Path) -> bool:
    """A zip archive (torch.save since torch 1.6) or a binary pickle (the legacy format)."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            return True
        f.seek(0)
        return f.read(1) == pickle.PROTO


def load_weights(path: str | Path, what: str = "checkpoint"):
    """``torch.load`` that never runs a pickle's code (``weights_only=True``), with its many failure
    types (KeyError, EOFError, RuntimeError, UnpicklingError) turned into one ``ReidError`` line."""
    path = Path(path)
    if path.is_dir():
        raise ReidError(f"{what} {path} is a folder; give the weights file in it")
    if not path.is_file():
        raise ReidError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _written_by_torch_save(path):
            reason = "not a file written by torch.save (empty, truncated or another format)"
        elif isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            reason = "it holds Python objects besides tensors, and untrusted pickles are not run (weights_only=True)"
        else:
            reason = f"damaged: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        raise ReidError(f"cannot read {what} {path}: {reason}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint written by ``save_checkpoint``; anything else raises ``ReidError``."""
    ckpt = load_weights(path)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model_state" not in ckpt:
        raise ReidError(f"{path} is not a reid training checkpoint (no model_args/model_state)")
    version = ckpt.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:  # a newer layout would be misread, not refused
        raise ReidError(f"{path} is a checkpoint of format {version}, written by a newer version of reid; this one "
                        f"reads format {FORMAT_VERSION} and older: use the version that wrote it, or a newer one")
    return ckpt


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The last epoch checkpoint a training run wrote into ``out_dir`` (``results_dir/train``), by
    epoch number: names are padded to 3 digits, so by name epoch 1000 came before epoch 999."""
    epochs = {}
    for path in out_dir.glob("model_epoch_*.pth"):
        number = path.stem.removeprefix("model_epoch_")
        if number.isdigit():
            epochs[int(number)] = path
    return epochs[max(epochs)] if epochs else None


def model_required(key: str, accepts: str, results_dir: str) -> ConfigError:
    """The error of ``reid evaluate``/``inference``/``export`` given no model: the usual answer is
    the checkpoint that training wrote last under the same ``results_dir``, so it is named."""
    last = latest_checkpoint(Path(results_dir) / "train")
    hint = f"; the last checkpoint training wrote under results_dir={results_dir} is {key}={last}" if last else ""
    return ConfigError(f"{key} is required ({accepts}){hint}")
