"""Dynamic batching across callers (the Triton dynamic-batcher idea, for one engine).

Images from every request join one bounded queue. A single worker forms batches of up to
``max_batch_size`` images, waiting at most ``max_queue_delay`` after the oldest image for more,
and runs them on the engine in its own thread while the event loop keeps decoding and queueing.
Results go back to each image's future, so requests larger than a batch are split and order is
kept. Images whose deadline passed are dropped before inference; cancelled requests leave the queue.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np


class QueueFull(Exception):
    """Not enough room in the queue for the request's images: fail fast (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed before its images reached the engine."""


class EngineFailed(Exception):
    """The engine raised on the batch that held this image."""


@dataclass
class _Item:
    array: np.ndarray
    future: asyncio.Future
    deadline: float | None
    request: int
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(self, engine, max_batch_size: int = 32, max_queue_delay: float = 0.002, queue_capacity: int = 1024,
                 batching: bool = True, metrics=None):
        self.engine = engine
        self.max_batch_size = max(1, min(max_batch_size, engine.max_batch_size))
        self.max_queue_delay = max_queue_delay
        self.queue_capacity = queue_capacity
        self.batching = batching
        self.metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._next_request = 0
        self._reserved = 0
        self.images_inferred = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish everything queued, then stop the worker."""
        if self._task is None:
            return
        while self._pending:
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._pool.shutdown(wait=True)

    def reserve(self, n: int) -> None:
        """Claim room for ``n`` images before decoding them, so a full server refuses a call
        without spending CPU on it. Pair with ``release`` once the images are submitted or dropped."""
        if len(self._pending) + self._reserved + n > self.queue_capacity:
            raise QueueFull(f"queue holds {len(self._pending) + self._reserved} of {self.queue_capacity} images; "
                            f"no room for {n} more")
        self._reserved += n

    def release(self, n: int) -> None:
        self._reserved -= n

    def submit(self, arrays: list[np.ndarray], deadline: float | None) -> list[asyncio.Future]:
        """Queue preprocessed images (3 x H x W float32); ``deadline`` is a ``time.monotonic()`` value."""
        if len(self._pending) + self._reserved + len(arrays) > self.queue_capacity:
            raise QueueFull(f"queue holds {len(self._pending) + self._reserved} of {self.queue_capacity} images; "
                            f"no room for {len(arrays)} more")
        loop = asyncio.get_running_loop()
        request = self._next_request
        self._next_request += 1
        futures = []
        for array in arrays:
            fut = loop.create_future()
            self._pending.append(_Item(array, fut, deadline, request))
            futures.append(fut)
        self._gauge()
        self._wakeup.set()
        return futures

    def discard(self, futures: list[asyncio.Future]) -> None:
        """Drop a cancelled request's images that have not reached the engine."""
        gone = set(map(id, futures))
        self._pending = deque(item for item in self._pending if id(item.future) not in gone)
        for fut in futures:
            fut.cancel()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))

    async def _wait_for_more(self) -> None:
        oldest = self._pending[0].enqueued
        while len(self._pending) < self.max_batch_size:
            remaining = oldest + self.max_queue_delay - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        now = time.monotonic()
        first_request = self._pending[0].request
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending[0]
            if not self.batching and item.request != first_request:
                break
            self._pending.popleft()
            if item.future.done():  # cancelled caller
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(DeadlineExpired("deadline passed while queued; not run"))
                continue
            batch.append(item)
        self._gauge()
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batching:
                await self._wait_for_more()
            batch = self._take_batch()
            if not batch:
                continue
            started = time.monotonic()
            if self.metrics:
                for item in batch:
                    self.metrics.stage_seconds.labels("queue").observe(started - item.enqueued)
                self.metrics.batch_size.observe(len(batch))
            try:
                out = await loop.run_in_executor(self._pool, self.engine.run, np.stack([i.array for i in batch]))
                if out.shape[0] != len(batch):
                    raise RuntimeError(f"engine returned {out.shape[0]} rows for {len(batch)} images")
            except Exception as exc:  # noqa: BLE001 - any engine failure fails this batch only
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(EngineFailed(f"engine failed on this batch: {exc}"))
                continue
            self.images_inferred += len(batch)
            if self.metrics:
                self.metrics.stage_seconds.labels("inference").observe(time.monotonic() - started)
                self.metrics.images_inferred.inc(len(batch))
            for item, row in zip(batch, out):
                if not item.future.done():
                    item.future.set_result(row)
