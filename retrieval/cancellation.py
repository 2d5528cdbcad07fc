"""Stopping read-only work whose caller has gone, at the next convenient point.

A server runs a call's heavy parts (a gallery call, decoding a request's images) in worker
threads. When the caller's deadline passes or it cancels, the coroutine awaiting the thread is
cancelled, but the thread itself runs on: a joint re-ranked search of 64 queries over 100,000
entries held one for 43 s after its caller had given up, and a few such calls kept every other
caller's searches waiting. The server runs the work through ``run_cancellable`` with an event it
sets when the call ends early; the long loops of searching, re-ranking and decoding call
``check_cancelled`` between steps, which then raises ``Cancelled``.

Only reads check: a change to a gallery, once begun, always completes. Outside
``run_cancellable`` (offline evaluation, tests, scripts) the checks cost a lookup and never raise.
"""
from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Callable, TypeVar

T = TypeVar("T")

_CALL_ENDED: ContextVar[threading.Event | None] = ContextVar("reid_call_ended", default=None)


class Cancelled(Exception):
    """The caller of this work has gone; nobody will read its result."""


def run_cancellable(ended: threading.Event, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` in this thread, its ``check_cancelled`` calls raising once ``ended`` is set."""
    token = _CALL_ENDED.set(ended)
    try:
        return fn(*args)
    finally:
        _CALL_ENDED.reset(token)


def check_cancelled() -> None:
    """Raise ``Cancelled`` when the call this thread runs for has ended early."""
    ended = _CALL_ENDED.get()
    if ended is not None and ended.is_set():
        raise Cancelled("the caller has gone")
