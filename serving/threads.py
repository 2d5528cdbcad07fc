"""Thread pools whose threads carry their stage's name down to the operating system.

Python names pool threads ("inference_0") only for itself: ``top -H``, ``ps -L``, py-spy and
``/proc/PID/task/*/comm`` show every one of them as "python". Naming the OS thread too lets an
operator see which stage of a busy server uses the CPU (decoding, inference, gallery work), and
lets ``benchmarks/serve.py`` split the server's CPU time by stage.
"""
from __future__ import annotations

import asyncio
import ctypes
import sys
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

from retrieval.cancellation import run_cancellable

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
