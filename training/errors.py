"""Errors that the CLI reports as one line and a non-zero exit instead of a stack trace."""

import threading


class ReidError(Exception):
    """Base class for user-facing errors (bad spec, bad data, bad model file)."""


class ConfigError(ReidError):
    """The spec or an override is invalid; the message names the key."""


class DataError(ReidError):
    """A dataset folder or image cannot be used; the message names the path."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``docker stop``, a scheduler taking the machine back), handled like Ctrl-C: the
    default action ended the process without a word about where to go on from."""


# Set with the SIGTERM that raised ``Terminated``: the training loop raises it again at its next
# batch, in case the first landed somewhere that lost it.
STOP_REQUESTED = threading.Event()


class TrainingDiverged(ReidError):
    """The loss stopped being a finite number: the weights are lost from that step on."""


def os_error_line(exc: OSError) -> str:
    """An OSError as the CLIs print it: the path and the reason (``/x/y: Permission denied``)."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def missing_torch(exc: ImportError, subject: str) -> str | None:
    """The line for a command (``subject`` names it) that needs PyTorch, run where only the base
    install is (the serving image has none: serving never imports it), or None for any other
    missing module. Without it the command ended in a traceback of ``No module named 'torch'``."""
    name = (exc.name or "").partition(".")[0]
    if name not in ("torch", "torchvision", "timm"):
        return None
    return (f"{subject} needs PyTorch, and {name} is not installed here: install reid's train extra "
            "(pip install '.[train]' in a checkout; the image of Dockerfile.train has it)")
