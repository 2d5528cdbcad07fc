"""Thread pools whose threads carry their stage's name down to the operating system.

Python names pool threads ("inference_0") only for itself: ``top -H``, ``ps -L``, py-spy and
``/proc/PID/task/*/comm`` show every one of them as "python". Naming the OS thread too lets an
operator see which stage of a busy server uses the CPU (decoding, inference, gallery work), and
lets ``benchmarks/serve.py`` split the server's CPU time by stage.
"""
from __future__ import annotations

import asyncio
import ctypes
import math
import os
import sys
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from retrieval.cancellation import run_cancellable

CGROUP_ROOT = Path("/sys/fs/cgroup")
_PR_SET_NAME = 15  # linux/prctl.h
_OS_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one NUL


def stage_pool(stage: str, workers: int) -> ThreadPoolExecutor:
    """A pool for one stage: threads named ``{stage}_0``, ``{stage}_1``... in Python and in the OS."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=stage, initializer=name_os_thread)


async def run_for_caller(pool: Executor, fn, *args):
    """``fn(*args)`` in ``pool`` for the call awaiting it. If that call is cancelled first (its
    deadline passed, or its caller cancelled), the thread runs on, but the work's
    ``check_cancelled`` calls (``retrieval.cancellation``) raise from then on, so it stops at its
    next step instead of finishing for nobody."""
    ended = threading.Event()
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, run_cancellable, ended, fn, *args)
    except asyncio.CancelledError:
        ended.set()
        raise


def name_os_thread() -> None:
    """Give the calling thread's Python name to the OS thread (Linux; elsewhere nothing happens).

    Never for the main thread: its OS name is the process name that ``ps`` and ``top`` list.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is threading.main_thread():
        return
    name = threading.current_thread().name.encode()[:_OS_NAME_BYTES]
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def cpu_quota_cores() -> int | None:
    """The cores a cgroup CPU quota allows this process (``docker run --cpus``, a Kubernetes CPU
    limit), rounded up; None without a quota. The CPU affinity does not show a quota: a container
    limited to 2 CPUs on a 64-core host sees 64, and 32 threads per engine run there would spend
    the quota in a few milliseconds and then be throttled for the rest of each period."""
    try:
        quota, period = (CGROUP_ROOT / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: none
            period = (CGROUP_ROOT / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def usable_cores() -> tuple[int, bool]:
    """(cores this process may use, whether a cgroup quota is what limits it)."""
    affinity = len(os.sched_getaffinity(0))
    quota = cpu_quota_cores()
    return (quota, True) if quota is not None and quota < affinity else (affinity, False)
