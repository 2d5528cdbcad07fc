"""One process owns a FAISS gallery folder: a second one opening it is refused, not let in.

Two servers on one ``--gallery-dir`` (two replicas given the same volume, or a new server started
before the old one has exited) would each replay the same log, append to it and write snapshots
over each other's: entries the other acknowledged would be lost without a word. So the store
takes an exclusive lock on ``ROOT/.owner.lock`` when it opens the folder and holds it until it
closes. The lock is the kernel's (``lockf``, a POSIX record lock, honoured over NFS as well), so
it goes with its process, however that process ends: no stale lock is ever left to clear by hand.
A POSIX record lock belongs to a process, so it keeps out other processes only: a second store on
the same folder inside one process is not refused (the tests open one that way to stand for the
restart after a crash), and closing either releases the lock for both.

The file also says who holds it (pid, host, since when), for the error the next process gives.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from retrieval.gallery.base import GalleryError

LOCK_NAME = ".owner.lock"  # no gallery name starts with a dot


class GalleryDirInUse(GalleryError):
    """Another process owns the gallery folder."""


class OwnerLock:
    """The held lock on ``root``'s galleries; ``release`` (or the process's end) lets the next owner in."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "a process that has not said who it is"
            os.close(fd)
            raise GalleryDirInUse(
                f"gallery directory {root} is in use by another process ({holder}); one server owns a FAISS gallery "
                "directory: stop that one first, give this one its own --gallery-dir, or share galleries between "
                "servers through Milvus (--gallery-backend milvus)") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
                  .encode(), 0)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the process's lock on the file
            self.fd = None
