"""The dynamic batcher over random mixes of callers: sizes above and below the batch, instances,
batching on and off, deadlines that pass in the queue, callers that give up, decoding reserved
before submitting, an engine that fails now and then. Each scenario test elsewhere pins one
interleaving; here hypothesis draws many, and every caller must get exactly its own rows in order
or its own error, no image of an expired or abandoned request may reach the engine after it was
given up, and the queue must end empty with nothing reserved."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.batcher import DeadlineExpired, DynamicBatcher, EngineFailed


class RecordingEngine:
    """Returns each image's first pixel as its embedding (the image says whose it is); sleeps a
    little per batch so that batches overlap with arrivals; fails the batches it is told to."""

    name = "recording"
    max_batch_size = 64
    thread_safe_run = True
    instances = 1

    def __init__(self, seconds_per_batch: float, failing_batches: set[int]):
        self.seconds, self.failing = seconds_per_batch, failing_batches
        self.lock = threading.Lock()
        self.batches: list[list[tuple[int, int]]] = []

    def run_pixels(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            number = len(self.batches)
            self.batches.append([(int(p[0, 0, 0]) * 256 + int(p[0, 0, 1]), int(p[0, 0, 2])) for p in pixels])
        time.sleep(self.seconds)
        if number in self.failing:
            raise RuntimeError(f"batch {number} failed")
        return pixels[:, 0, 0, :].astype(np.float32)


def image(request: int, index: int) -> np.ndarray:
    pixels = np.zeros((2, 2, 3), np.uint8)
    pixels[0, 0] = (request // 256, request % 256, index)
    return pixels


callers = st.lists(st.tuples(
    st.integers(1, 20),  # images
    st.floats(0, 0.02),  # arrival delay
    st.sampled_from(["wait", "wait", "wait", "expire", "cancel"]),
    st.booleans(),  # reserve room first, as the server does while decoding
), min_size=1, max_size=24)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(callers=callers, max_batch=st.integers(1, 9), instances=st.integers(1, 3), batching=st.booleans(),
       delay=st.sampled_from([0.0, 0.002, 0.01]), seconds=st.sampled_from([0.0, 0.003]),
       failing=st.sets(st.integers(0, 30), max_size=3))
def test_every_caller_gets_its_own_rows_or_its_own_error(callers, max_batch, instances, batching, delay, seconds, failing):
    engine = RecordingEngine(seconds, failing)
    outcomes: dict[int, object] = {}
    dropped: set[tuple[int, int]] = set()  # (request, image) still queued when its caller gave up

    async def caller(batcher: DynamicBatcher, request: int, size: int, wait: float, fate: str, reserve: bool) -> None:
        await asyncio.sleep(wait)
        arrays = [image(request, i) for i in range(size)]
        if reserve:
            batcher.reserve(size)
            await asyncio.sleep(0)  # decoding
            batcher.release(size)
        deadline = time.monotonic() + (0.001 if fate == "expire" else 60)
        future = batcher.submit(arrays, deadline)
        if fate == "cancel":
            await asyncio.sleep(0.001)
            if not future.done():
                dropped.update((request, item.index) for item in batcher._pending if item.request.future is future)
                batcher.discard(future)
                outcomes[request] = "cancelled" if future.cancelled() else "left pending"
                return
        try:
            outcomes[request] = await future
        except (DeadlineExpired, EngineFailed) as exc:
            outcomes[request] = exc

    async def main() -> DynamicBatcher:
        batcher = DynamicBatcher(engine, max_batch_size=max_batch, max_queue_delay=delay, queue_capacity=10_000,
                                 batching=batching, instances=instances)
        batcher.start()
        await asyncio.wait_for(asyncio.gather(*(caller(batcher, r, *c) for r, c in enumerate(callers))), 60)
        await batcher.stop()
        return batcher

    batcher = asyncio.run(main())
    assert not batcher._pending and batcher._reserved == 0
    failed_batches = {n for n in failing if n < len(engine.batches)}
    failed_requests = {r for n in failed_batches for r, _ in engine.batches[n]}
    for request, (size, _, fate, _) in enumerate(callers):
        outcome = outcomes[request]
        if isinstance(outcome, np.ndarray):
            assert outcome.shape == (size, 3)
            assert outcome[:, 0].tolist() == [request // 256] * size and outcome[:, 1].tolist() == [request % 256] * size
            assert outcome[:, 2].tolist() == list(range(size))  # its own rows, in order
            assert request not in failed_requests
        elif isinstance(outcome, EngineFailed):
            assert request in failed_requests
        elif isinstance(outcome, DeadlineExpired):
            assert fate == "expire"
        else:
            assert fate == "cancel" and outcome == "cancelled"
    for batch in engine.batches:
        assert len(batch) <= max_batch
        if not batching:  # one request's images per batch
            assert len({r for r, _ in batch}) == 1
    ran = {image for batch in engine.batches for image in batch}
    assert not dropped & ran  # a discarded request's queued images never reach the engine
