"""Output files of long commands, checked before the work that fills them."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from training.errors import ConfigError


def writable_output(path: str | Path, key: str) -> Path:
    """Create ``path``'s folder and check that the file can be written there, so that a mistyped or
    read-only output path stops ``reid evaluate``/``inference`` before the embedding, not after it.
    ``key`` names the spec key to fix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot create folder {path.parent}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise ConfigError(f"{key}={path} is a folder; give a file name")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{key}={path}: cannot write there (permission denied)")
    return path


@contextmanager
def replaced_on_success(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error, removed otherwise. A crash or Ctrl-C mid-write then leaves the previous file
    whole instead of a truncated one. A write error that names no file (a full disk: the OS
    reports it on the write, not the open) is given ``path``'s name, for the one-line errors."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            exc.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)
