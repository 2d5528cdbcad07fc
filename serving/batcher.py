"""Dynamic batching across callers (the Triton dynamic-batcher idea, for one engine).

Images from every request join one bounded queue. A worker forms batches of up to
``max_batch_size`` images, waiting at most ``max_queue_delay`` after the oldest image for more
(and only while more images are being decoded), and runs them on the engine in its own thread
while the event loop keeps decoding and queueing.
With ``instances`` > 1 (Triton's instance count) that many workers keep batches in flight at once,
for engines whose ``run`` is thread-safe: on a CPU, two single-threaded runs lose less to
preemption by decoding than one run split over two threads. When a full batch would run longer
than ``split_seconds``, each instance takes only its fair share of the images, so callers wait
for batches of about equal length instead of some for one long batch.
Each request gets one future, resolved with its rows in order once its last image is embedded,
so requests larger than a batch are split and reassembled. Images whose deadline passed are
dropped before inference; cancelled requests leave the queue.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from serving.threads import stage_pool

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Not enough room in the queue for the request's images: fail fast (RESOURCE_EXHAUSTED)."""


class DeadlineExpired(Exception):
    """The request's deadline passed before its images reached the engine."""


class EngineFailed(Exception):
    """The engine raised on the batch that held this image."""


@dataclass(eq=False)
class _Request:
    future: asyncio.Future  # resolves to a len(arrays) x D float32 array
    size: int
    deadline: float | None
    rows: np.ndarray | None = None  # allocated when the first row arrives
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = self.size

    def deliver(self, index: int, row: np.ndarray) -> None:
        if self.future.done():  # cancelled, expired or failed meanwhile
            return
        if self.rows is None:
            self.rows = np.empty((self.size, row.shape[0]), dtype=np.float32)
        self.rows[index] = row
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(self.rows)

    def fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass(eq=False)
class _Item:
    array: np.ndarray
    request: _Request
    index: int
    enqueued: float


class DynamicBatcher:
    def __init__(self, engine, max_batch_size: int = 32, max_queue_delay: float = 0.0, queue_capacity: int = 1024,
                 batching: bool = True, metrics=None, instances: int = 0, split_seconds: float = 0.25,
                 on_batch: Callable[[Exception | None], None] | None = None):
        instances = instances or engine.instances  # 0: the engine's choice
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        if instances > 1 and not engine.thread_safe_run:
            raise ValueError(f"the {engine.name} engine runs one batch at a time; use 1 instance, not {instances}")
        self.engine = engine
        self.instances = instances
        self.max_batch_size = max(1, min(max_batch_size, engine.max_batch_size))
        self.max_queue_delay = max_queue_delay
        self.queue_capacity = queue_capacity
        self.batching = batching
        self.metrics = metrics
        self._pending: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None  # set when images arrive for idle workers
        self._filling: list[asyncio.Future] = []  # workers waiting for a full batch or their delay
        self._tasks: list[asyncio.Task] = []
        self._pool = stage_pool("inference", instances)
        self._reserved = 0
        self.split_seconds = split_seconds
        self._running_images = 0  # images in batches that are in the engine now
        self._seconds_per_image = 0.0  # running average of the engine's time per image; 0 until measured
        self.images_inferred = 0
        self.on_batch = on_batch  # told of each batch's outcome: None, or the engine's exception

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()) for _ in range(self.instances)]

    async def stop(self) -> None:
        """Finish everything queued, then stop the workers."""
        if not self._tasks:
            return
        while self._pending:
            await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._pool.shutdown(wait=True)

    def reserve(self, n: int) -> None:
        """Claim room for ``n`` images before decoding them, so a full server refuses a call
        without spending CPU on it. Pair with ``release`` once the images are submitted or dropped."""
        self._check_room(n)
        self._reserved += n

    def _check_room(self, n: int) -> None:
        held = len(self._pending) + self._reserved
        if held + n > self.queue_capacity:
            raise QueueFull(f"queue holds {held} of {self.queue_capacity} images; no room for {n} more")

    def release(self, n: int) -> None:
        self._reserved -= n
        self._end_waits_in_vain()  # the images may all have been refused: nothing more is coming

    def submit(self, arrays: list[np.ndarray], deadline: float | None) -> asyncio.Future:
        """Queue preprocessed images (H x W x 3 uint8 at the input size); ``deadline`` is a ``time.monotonic()``
        value. The future resolves to their embeddings, one row per image in order."""
        self._check_room(len(arrays))
        request = _Request(asyncio.get_running_loop().create_future(), len(arrays), deadline)
        now = time.monotonic()
        self._pending.extend(_Item(array, request, i, now) for i, array in enumerate(arrays))
        self._gauge()
        self._wakeup.set()
        self._end_waits_in_vain()
        return request.future

    def discard(self, future: asyncio.Future) -> None:
        """Drop a cancelled or failed request's images that have not reached the engine."""
        self._pending = deque(item for item in self._pending if item.request.future is not future)
        future.cancel()
        self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._pending))

    def _more_coming(self) -> bool:
        """Whether waiting can fill the batch further: it is not full yet and images are being
        decoded right now (``reserve``d, not yet submitted)."""
        return len(self._pending) < self.max_batch_size and self._reserved > 0

    def _end_waits_in_vain(self) -> None:
        if not self._more_coming():
            for waiter in self._filling:
                if not waiter.done():
                    waiter.set_result(None)

    async def _wait_for_more(self) -> None:
        """Until the batch is full, no more images are on their way, or the oldest image has
        waited ``max_queue_delay``.

        Waiting only while images are being decoded spares a lone caller the whole delay (there is
        nobody to batch with); under load, calls arrive while the engine runs, so batches still fill.
        One timer per batch, not one wake-up per arriving request: with single-image callers the
        per-request wake-ups cost the event loop more than the batching saved.
        """
        if not self._more_coming():
            return
        remaining = self._pending[0].enqueued + self.max_queue_delay - time.monotonic()
        if remaining <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(remaining, lambda: waiter.done() or waiter.set_result(None))
        self._filling.append(waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._filling.remove(waiter)

    def _batch_limit(self) -> int:
        """The most images this worker takes now: ``max_batch_size``, or, when one full batch would
        run longer than ``split_seconds``, this instance's fair share of the images queued and in
        the engine.

        Long batches taken whole made callers unequal: a worker that woke first took every queued
        image, and its callers then waited for that long batch while the other instance cycled
        through a few (Swin-Tiny on a CPU, about 90 ms per image, 16 callers: p99 up to 5x p50).
        With fair shares both instances run batches of about the same length (p99 1.3-1.5x p50).
        Shorter batches stay whole: the latency gain is small and each extra batch costs the event
        loop (OSNet-x0.25, about 4 ms per image under load, lost about 5 % at 64 callers x 1 crop
        when its 32-image batches were shared at a 50 ms threshold).
        """
        size = min(len(self._pending), self.max_batch_size)
        if not self.batching or self.instances == 1 or size * self._seconds_per_image <= self.split_seconds:
            return self.max_batch_size
        share = math.ceil((len(self._pending) + self._running_images) / self.instances)
        return max(1, min(self.max_batch_size, share))

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        if not self._pending:
            return batch
        now = time.monotonic()
        first_request = self._pending[0].request
        limit = self._batch_limit()
        while self._pending and len(batch) < limit:
            item = self._pending[0]
            if not self.batching and item.request is not first_request:
                break
            self._pending.popleft()
            request = item.request
            if request.future.done():  # cancelled, expired or failed
                continue
            if request.deadline is not None and now > request.deadline:
                request.fail(DeadlineExpired("deadline passed while queued; not run"))
                continue
            batch.append(item)
        self._gauge()
        return batch

    async def probe(self, pixels: np.ndarray) -> None:
        """Run ``pixels`` on the engine in the inference threads, outside any batch (a health probe
        of an engine that failed; it raises as the engine does)."""
        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.run_pixels, pixels)

    def _infer(self, batch: list[_Item]) -> np.ndarray:
        """In an inference thread: stack (a few MB; kept off the event loop) and run. The engine
        returns one row per image or raises (``Engine._embeddings``)."""
        return self.engine.run_pixels(np.stack([item.array for item in batch]))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        metrics = self.metrics
        queue_seconds = metrics.stage_seconds.labels("queue") if metrics else None
        inference_seconds = metrics.stage_seconds.labels("inference") if metrics else None
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
            if metrics:
                for item in batch:
                    queue_seconds.observe(started - item.enqueued)
                metrics.batch_size.observe(len(batch))
            self._running_images += len(batch)
            try:
                out = await loop.run_in_executor(self._pool, self._infer, batch)
            except Exception as exc:  # noqa: BLE001 - any engine failure fails this batch's requests only
                for item in batch:
                    item.request.fail(EngineFailed(f"engine failed on this batch: {exc}"))
                if self.on_batch:
                    self.on_batch(exc)
                continue
            finally:
                self._running_images -= len(batch)
            try:
                elapsed = time.monotonic() - started
                per_image = elapsed / len(batch)
                self._seconds_per_image = per_image if not self._seconds_per_image else (
                    0.8 * self._seconds_per_image + 0.2 * per_image)
                self.images_inferred += len(batch)
                if metrics:
                    inference_seconds.observe(elapsed)
                    metrics.images_inferred.inc(len(batch))
                for item, row in zip(batch, out):
                    item.request.deliver(item.index, row)
                if self.on_batch:
                    self.on_batch(None)
            except Exception as exc:  # noqa: BLE001 - an error escaping here would end this worker, and
                # every later request would wait forever: fail this batch's requests and go on
                log.exception("delivering a batch's results failed")
                for item in batch:
                    item.request.fail(EngineFailed(f"delivering this batch's results failed: {exc}"))
