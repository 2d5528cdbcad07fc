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
Where there can be no lock, the folder opens with a warning: on a read-only filesystem (as it did
before there was a lock: a replica can serve searches from a read-only mount) and on one without
locks. A lock file this user may not write is an error: the galleries beside it may be writable.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from retrieval.gallery.base import GalleryError

log = logging.getLogger(__name__)
LOCK_NAME = ".owner.lock"  # no gallery name starts with a dot


class GalleryDirInUse(GalleryError):
    """Another process owns the gallery folder."""


class OwnerLock:
    """The held lock on ``root``'s galleries; ``release`` (or the process's end) lets the next owner in."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.fd: int | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno == errno.EACCES:  # e.g. left by a server run as another user: its galleries may be writable
                raise GalleryError(f"cannot open {self.path}: permission denied; make it writable by this user "
                                   "(it is how a server keeps others off this gallery directory)") from None
            if exc.errno != errno.EROFS:
                raise
            # a read-only filesystem (a replica serving searches from a read-only mount) opens as
            # before: this process cannot write there, so it cannot harm another that does
            log.warning("cannot lock %s (%s): opening the galleries without it; changes to them will fail",
                        self.path, exc.strerror or exc)
            return
        try:
            if self._lock(root):
                os.ftruncate(self.fd, 0)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def _lock(self, root: Path) -> bool:
        """True once held; False where the filesystem has no locks (said in a warning, not refused)."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: not "held by another"
                log.warning("cannot lock %s (%s): nothing keeps a second server off this gallery directory",
                            self.path, exc.strerror or exc)
                return False
        holder = os.read(self.fd, 512).decode("utf-8", "replace").strip() or "a process that has not said who it is"
        raise GalleryDirInUse(
            f"gallery directory {root} is in use by another process ({holder}); one server owns a FAISS gallery "
            "directory: stop that one first, give this one its own --gallery-dir, or share galleries between "
            "servers through Milvus (--gallery-backend milvus)")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the process's lock on the file
            self.fd = None
