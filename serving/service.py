"""The ReIdentification gRPC service: request validation, preprocessing, batching, responses.

One result per input image. Problems with one image become that image's error; problems with the
whole call (too many images, queue full, deadline, engine failure) become a gRPC status for unary
calls, and the same code on every result of that request on a stream (a stream stays open).
At shutdown a stream stops reading, answers every request it has read, and ends with UNAVAILABLE,
so that the caller resends the rest elsewhere at once instead of waiting out the grace period.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from retrieval.gallery import GalleryBackend
from serving.batcher import DeadlineExpired, DynamicBatcher, EngineFailed, QueueFull
from serving.engines.base import Engine, NonFiniteEmbedding
from serving.gallery_service import GalleryRpcs
from serving.image_errors import error_message
from serving.metrics import ServerMetrics, counting_bugs, timed
from serving.preprocessing import count_images, prepare
from serving.proto import reid_pb2, reid_pb2_grpc
from serving.threads import run_for_caller, stage_pool
from serving.wire import embedding_message

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_images_per_request: int = 256
    max_image_pixels: int = 4096 * 4096
    max_search_queries: int = 4096
    max_top_k: int = 100_000
    # Gallery items one re-ranked Search may gather (queries x pool x (k1 + 1), each term at most
    # the gallery; joint: their union): bounds its memory, and its CPU, which grows with the square
    # of a query's items. 200,000 = 95 queries a call with the default pool and k1.
    max_rerank_items: int = 200_000
    # Hits one Search may ask for (queries x top_k): the store holds them all before the answer is
    # sent, and at about 26 bytes each 2,000,000 are 52 MB, within the default 64 MiB message
    # limit that an answer of more would exceed anyway.
    max_search_hits: int = 2_000_000


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ReIdentificationService(GalleryRpcs, reid_pb2_grpc.ReIdentificationServicer):
    def __init__(self, engine: Engine, batcher: DynamicBatcher, metrics: ServerMetrics, limits: Limits, workers: int = 2,
                 store: GalleryBackend | None = None, gallery_threads: int = 4, gallery_queue_capacity: int = 256):
        self.engine, self.batcher, self.metrics, self.limits, self.store = engine, batcher, metrics, limits, store
        self.pool = stage_pool("preprocess", workers)
        self.gallery_pool = stage_pool("gallery", gallery_threads) if store is not None else None
        self.gallery_capacity = gallery_queue_capacity
        md = engine.metadata
        self.model_name = md.backbone or "model"
        self._preprocess_seconds = metrics.stage_seconds.labels("preprocess")
        self._total_seconds = metrics.stage_seconds.labels("total")
        self._stream_seconds = metrics.request_seconds.labels("EmbedStream")
        self._images_ok = metrics.images.labels("ok")
        self._closing = False
        self._stop_waiting_readers: set[Callable[[], None]] = set()  # of streams blocked on the caller's next request

    def close_streams(self) -> None:
        """Shutdown: every open stream stops reading, answers what it has read, and ends with UNAVAILABLE."""
        self._closing = True
        for stop_reading in list(self._stop_waiting_readers):
            stop_reading()

    async def embed_outcomes(self, request: reid_pb2.EmbedRequest, deadline: float | None) -> list:
        """One outcome per requested image, in order: an embedding (numpy row), its ``ImageError``,
        or ``NonFiniteEmbedding`` when the model gave NaN or infinity for it.

        Call-level failures raise ``RequestError``. Shared by Embed and the gallery RPCs, which
        use the rows directly.
        """
        n = count_images(request)
        if n == 0:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "request has no images and no frame boxes")
        if n > self.limits.max_images_per_request:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"request has {n} images; the limit is {self.limits.max_images_per_request}")
        md = self.engine.metadata
        try:
            self.batcher.reserve(n)  # refuse before spending CPU on decoding
        except QueueFull as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        try:
            start = time.monotonic()  # a caller that goes meanwhile: decoding stops at the next image
            prepared = await run_for_caller(self.pool, prepare, request, md.input_height, md.input_width,
                                            self.limits.max_image_pixels)
            self._preprocess_seconds.observe(time.monotonic() - start)
        finally:
            self.batcher.release(n)
        valid = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        rows: dict = {}  # index -> embedding row, or NonFiniteEmbedding
        broken = 0
        if valid:
            try:
                future = self.batcher.submit([prepared[i] for i in valid], deadline)
            except QueueFull as exc:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            try:
                embedded = await future
            except DeadlineExpired as exc:
                self.batcher.discard(future)
                raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
            except EngineFailed as exc:
                self.batcher.discard(future)
                raise RequestError(grpc.StatusCode.INTERNAL, str(exc)) from None
            except asyncio.CancelledError:
                self.batcher.discard(future)
                raise
            finite = np.isfinite(embedded).all(axis=1)
            broken = len(valid) - int(np.count_nonzero(finite))
            rows = {i: row if ok else NonFiniteEmbedding("the model gave a non-finite embedding (NaN or inf) for this image")
                    for i, row, ok in zip(valid, embedded, finite)}
        outcomes = [rows.get(i, p) for i, p in enumerate(prepared)]
        invalid = len(outcomes) - len(rows)
        self._images_ok.inc(len(rows) - broken)
        if invalid:
            self.metrics.images.labels("invalid").inc(invalid)
            self.metrics.errors.labels("INVALID_ARGUMENT").inc(invalid)
        if broken:
            self.metrics.images.labels("model_error").inc(broken)
            self.metrics.errors.labels("INTERNAL").inc(broken)
            log.error("the model gave non-finite embeddings for %d of %d images", broken, len(rows))
        return outcomes

    async def embed_arrays(self, request: reid_pb2.EmbedRequest, deadline: float | None) -> reid_pb2.EmbedResponse:
        md = self.engine.metadata
        response = reid_pb2.EmbedResponse(dimension=md.embedding_dim, normalized=md.output_normalized,
                                          request_id=request.request_id, model=self.model_name,
                                          model_id=self.engine.model_id)
        for outcome in await self.embed_outcomes(request, deadline):
            if isinstance(outcome, Exception):
                response.results.add(error=error_message(outcome))
            else:
                response.results.add(embedding=embedding_message(outcome))
        return response

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    @timed
    async def Embed(self, request, context):
        start = time.monotonic()
        try:
            response = await self.embed_arrays(request, self._deadline(context))
        except RequestError as exc:
            self._count("Embed", exc.code)
            await context.abort(exc.code, exc.message)
        self._count("Embed", grpc.StatusCode.OK)
        self._total_seconds.observe(time.monotonic() - start)
        return response

    async def EmbedStream(self, request_iterator, context):
        """Requests are processed concurrently (so they batch together) and answered in order."""
        pending: asyncio.Queue = asyncio.Queue(maxsize=64)
        closing = object()  # in the queue after the last request read before shutdown

        async def one(request):
            start = time.monotonic()
            try:
                response = await self.embed_arrays(request, self._deadline(context))
                self._count("EmbedStream", grpc.StatusCode.OK)
                return response
            except RequestError as exc:
                self._count("EmbedStream", exc.code)
                response = reid_pb2.EmbedResponse(request_id=request.request_id, model=self.model_name)
                for _ in range(max(count_images(request), 1)):
                    response.results.add(error=reid_pb2.Error(code=exc.code.value[0], message=exc.message))
                return response
            finally:
                self._stream_seconds.observe(time.monotonic() - start)

        stopped_for_shutdown = False

        def stop_reading() -> None:
            # Only called while the reader waits for the caller, so no request it read is lost.
            nonlocal stopped_for_shutdown
            stopped_for_shutdown = True
            read_task.cancel()

        async def reader():
            requests = aiter(request_iterator)
            try:
                while not self._closing:
                    self._stop_waiting_readers.add(stop_reading)
                    try:
                        request = await anext(requests)
                    finally:
                        self._stop_waiting_readers.discard(stop_reading)
                    await pending.put(asyncio.ensure_future(one(request)))
            except StopAsyncIteration:
                await pending.put(None)
                return
            except asyncio.CancelledError:
                if not stopped_for_shutdown:  # the call itself ended
                    raise
            await pending.put(closing)

        read_task = asyncio.ensure_future(reader())
        try:
            with counting_bugs(self.metrics, "EmbedStream"):
                while (task := await pending.get()) is not None:
                    if task is closing:
                        await context.abort(grpc.StatusCode.UNAVAILABLE,
                                            "the server is shutting down: every request read so far was answered; "
                                            "send the rest to another server")
                    yield await task
        finally:
            read_task.cancel()
            while not pending.empty():  # read, not answered, and now nobody to answer: stop their work
                task = pending.get_nowait()
                if isinstance(task, asyncio.Future):
                    task.cancel()

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        self.metrics.count_call(method, code.name)
