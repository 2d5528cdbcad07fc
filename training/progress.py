"""Progress of long loops: a tqdm bar on a terminal, a log line every half minute elsewhere.

A bar redraws itself with carriage returns, which a terminal shows in place but a file, ``docker
logs`` or a log collector keeps: a training epoch became one line holding every redraw (a 5-minute
epoch, some 300 of them), and a bar cleared at its end left no line break at all. Where stderr is
not a terminal, loops log ``epoch 3/120: 200/404 batches, 2.71 batch/s, about 75 s left, loss=...``
at most every ``LOG_INTERVAL_S`` seconds instead, through ``logging`` like the rest of the output.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)
T = TypeVar("T")
LOG_INTERVAL_S = 30.0


def time_left(elapsed: float, done: int, remaining: int) -> str:
    """"about 25 min left" (or "about 40 s left", under a minute and a half) for ``remaining`` steps
    at the mean pace of the ``done`` ones so far; "" when none remain."""
    if remaining <= 0:
        return ""
    seconds = elapsed / done * remaining
    return f"about {seconds / 60:.0f} min left" if seconds >= 90 else f"about {seconds:.0f} s left"


class LoggedProgress:
    """The part of tqdm's interface our loops use (iteration, ``with``, ``set_postfix``), as log lines."""

    def __init__(self, iterable: Iterable[T], desc: str, unit: str, interval: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.iterable, self.desc, self.unit, self.interval, self.clock = iterable, desc, unit, interval, clock
        self.total = len(iterable) if hasattr(iterable, "__len__") else None
        self.postfix: dict[str, object] = {}

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        return None

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def __iter__(self) -> Iterator[T]:
        start = last = self.clock()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = self.clock()
            if now - last >= self.interval:
                last = now
                log.info("%s", self._line(done, now - start))

    def _line(self, done: int, seconds: float) -> str:
        rate = done / seconds if seconds > 0 else 0.0
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")  # batches, calls, ids
        parts = [f"{done}/{self.total} {units}" if self.total is not None else f"{done} {units}", f"{rate:.3g} {self.unit}/s"]
        if self.total is not None and seconds > 0 and done < self.total:
            parts.append(time_left(seconds, done, self.total - done))
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)


def progress(iterable: Iterable[T], desc: str, unit: str, *, disable: bool = False, leave: bool = True,
             mininterval: float = 0.1) -> tqdm | LoggedProgress:
    """A tqdm bar where stderr is a terminal or a notebook's output (which redraws a bar in place,
    though it is no terminal), else log lines (module docstring); nothing when ``disable`` (the
    ranks other than the first, under torchrun)."""
    if disable or sys.stderr.isatty() or "ipykernel" in sys.modules:
        return tqdm(iterable, desc=desc, unit=unit, disable=disable, leave=leave, mininterval=mininterval)
    return LoggedProgress(iterable, desc, unit)
