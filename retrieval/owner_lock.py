"""One process owns a folder it keeps writing to: a second process opening it is refused, not let in.

Two servers on one ``--gallery-dir`` (two replicas given the same volume, or a new server started
before the old one has exited) would each replay the same log, append to it and write snapshots
over each other's: entries the other acknowledged would be lost without a word. Two training runs
on one ``results_dir`` (a scheduler retrying a job that still runs, a resume started beside the
run) would overwrite each other's checkpoints epoch by epoch and mix their metrics logs. So the
owner takes an exclusive lock on ``FOLDER/.owner.lock`` when it opens the folder and holds it until
it is done. The lock is the kernel's (``lockf``, a POSIX record lock, honoured over NFS as well),
so it goes with its process, however that process ends: no stale lock is ever left to clear by
hand. A POSIX record lock belongs to a process, so it keeps out other processes only: a second
owner of the same folder inside one process is not refused (the tests open a gallery store that
way to stand for the restart after a crash), and releasing either releases the lock for both.

The file also says who holds it (pid, host, since when), for the error the next process gives.
Where there can be no lock, the folder opens with a warning: on a read-only filesystem (a replica
can serve searches from a read-only mount, as it did before there was a lock) and on one without
locks. A lock file this user may not write is an error: the folder beside it may be writable.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_NAME = ".owner.lock"  # no gallery name and no checkpoint name starts with a dot


class OwnerLock:
    """The held lock on ``folder``; ``release`` (or the process's end) lets the next owner in.

    ``keeps_off`` completes "the lock keeps ..." in messages (e.g. "other servers off this gallery
    directory"); ``in_use(holder)`` makes the error raised when another process holds the lock, and
    ``error(message)`` the one for a lock file this user may not open: each caller's own types.
    """

    def __init__(self, folder: Path, keeps_off: str, in_use: Callable[[str], Exception],
                 error: Callable[[str], Exception]):
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno == errno.EACCES:  # e.g. left by a process run as another user: the folder may be writable
                raise error(f"cannot open {self.path}: permission denied; make it writable by this user "
                            f"(the lock keeps {keeps_off})") from None
            if exc.errno != errno.EROFS:
                raise
            # a read-only filesystem opens as before: this process cannot write there, so it cannot
            # harm another that does
            log.warning("cannot lock %s (%s): going on without it; nothing can be changed there",
                        self.path, exc.strerror or exc)
            return
        try:
            if self._lock(keeps_off, in_use):
                os.ftruncate(self.fd, 0)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
                os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp}\n".encode(), 0)
        except BaseException:
            self.release()
            raise

    def _lock(self, keeps_off: str, in_use: Callable[[str], Exception]) -> bool:
        """True once held; False where the filesystem has no locks (said in a warning, not refused)."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):  # ENOLCK, EOPNOTSUPP: not "held by another"
                log.warning("cannot lock %s (%s): nothing keeps %s", self.path, exc.strerror or exc, keeps_off)
                return False
        holder = os.read(self.fd, 512).decode("utf-8", "replace").strip() or "a process that has not said who it is"
        raise in_use(holder)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the process's lock on the file
            self.fd = None
