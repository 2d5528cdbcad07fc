"""Helpers for tests that start a real gRPC server in-process (on a free loopback port)."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from serving.engines.base import Engine
from serving.server import ReidServer, ServerConfig


class ServerThread:
    """A ``ReidServer`` on its own event loop in a background thread."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None):
        self.config = config or ServerConfig(port=0)
        self.server = ReidServer(engine, self.config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=60)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics(self):
        return self.server.metrics

    def stop(self, grace: float = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(timeout=60)

    def __exit__(self, *exc) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class SlowEngine(Engine):
    """Wraps an engine, sleeping before each batch (``delay``, plus ``per_image`` for each image)
    and optionally failing the n-th call."""

    name = "slow"

    def __init__(self, inner: Engine, delay: float = 0.3, fail_on_call: int | None = None, thread_safe: bool = False,
                 per_image: float = 0.0):
        self.inner, self.delay, self.fail_on_call, self.per_image = inner, delay, fail_on_call, per_image
        self.metadata = inner.metadata
        self.model_id = inner.model_id
        self.max_batch_size = inner.max_batch_size
        self.thread_safe_run = thread_safe
        self.calls: list[int] = []
        self.running = self.most_running = 0
        self._lock = threading.Lock()

    def _run(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append(len(batch))
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            call = len(self.calls)
        try:
            time.sleep(self.delay + self.per_image * len(batch))
            if self.fail_on_call is not None and call == self.fail_on_call:
                raise RuntimeError("injected engine failure")
            return self.inner._run(batch)
        finally:
            with self._lock:
                self.running -= 1
