"""The shared memory that data-loader workers hand batches through (``/dev/shm`` on Linux).

Each worker process puts its batches in shared memory for the main process, up to two batches a
worker ahead (DataLoader's ``prefetch_factor``). Docker gives a container 64 MiB of it unless told
otherwise, less than two workers need for 64 crops of 256x128, and the shortfall surfaced as a
RuntimeError from inside torch's collate, or a worker killed by SIGBUS. A warning comes before the
first batch where the room is plainly too small, and the failure itself becomes one line.
"""
from __future__ import annotations

import logging
import os

from training.errors import ReidError

log = logging.getLogger(__name__)

SHM = "/dev/shm"
WORKERS_KEY = "dataset.num_workers"  # the one setting that sizes every loader's worker count
PREFETCH_FACTOR = 2  # DataLoader's default: batches each worker prepares ahead


def _free_bytes() -> int | None:
    try:
        stat = os.statvfs(SHM)
    except OSError:  # not Linux, or no /dev/shm: torch shares memory some other way
        return None
    return stat.f_bavail * stat.f_frsize


def _advice() -> str:
    return (f"give the container more (docker run --shm-size=2g, or --ipc=host; Kubernetes: an emptyDir "
            f"with medium Memory at {SHM}), or lower {WORKERS_KEY} (0 loads in the main process, slower)")


def check_shared_memory(batch_size: int, height: int, width: int, num_workers: int) -> None:
    """Warn when ``num_workers`` workers' float32 batches in flight would not fit in the free
    shared memory."""
    free = _free_bytes()
    if num_workers == 0 or free is None:
        return
    need = num_workers * PREFETCH_FACTOR * batch_size * 3 * height * width * 4
    if need > free:
        log.warning("%s=%d workers keep about %d MiB of batches in shared memory, and %s has %d MiB free: %s",
                    WORKERS_KEY, num_workers, need >> 20, SHM, free >> 20, _advice())


def shared_memory_error(exc: BaseException) -> ReidError | None:
    """The one-line error for a data loader that ran out of shared memory; None for any other error."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or ("shared memory" not in text and "(shm)" not in text):
        return None
    free = _free_bytes()
    room = f" ({SHM}: {free >> 20} MiB free now)" if free is not None else ""
    return ReidError(f"the data loader's workers ran out of shared memory{room}: {_advice()}")
