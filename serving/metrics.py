"""Prometheus metrics of one server (own registry, so several servers can live in one process)."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from retrieval.gallery import GalleryBackend, GalleryError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IMAGE_OUTCOMES = ("ok", "invalid", "model_error")  # reid_images_total's outcome label


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("reid_requests_total", "RPCs by method and final status code", ["method", "code"], registry=r)
        self.images = Counter("reid_images_total", "Images received, by outcome", ["outcome"], registry=r)
        self.images_inferred = Counter("reid_images_inferred_total", "Images that went through the engine", registry=r)
        self.batch_size = Histogram("reid_batch_size", "Images per engine call", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("reid_queue_depth", "Images waiting for the engine", registry=r)
        self.gallery_calls = Gauge("reid_gallery_calls", "Gallery calls waiting for or running on the gallery threads",
                                   registry=r)
        self.stage_seconds = Histogram("reid_stage_seconds", "Latency per stage", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("reid_request_seconds", "Whole-call latency by RPC method (EmbedStream: per message), "
                                         "failed calls included", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("reid_errors_total", "Errors by gRPC status code (per call and per image)", ["code"], registry=r)
        self.credential_reloads = Counter(
            "reid_credential_reloads_total", "Times the TLS files or the tokens file changed and were read again, by "
            "outcome (refused: they held no valid set, and the one in use stayed)", ["credential", "outcome"], registry=r)
        # Every code and outcome starts at 0: Prometheus's rate() and increase() see no rise in a
        # series whose first sample is already 1, so an alert on "any INTERNAL error" missed the first.
        for code in grpc.StatusCode:
            if code != grpc.StatusCode.OK:
                self.errors.labels(code.name)
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome)
        self.tls_not_after = Gauge("reid_tls_certificate_expiry_timestamp_seconds",
                                   "When the TLS certificate served expires (seconds since the epoch; 0 without TLS)",
                                   registry=r)

    def count_call(self, method: str, code: str) -> None:
        """One call of ``method`` that ended with status ``code`` (a name: "OK", "UNAVAILABLE")."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(code).inc()

    def watch_reloads(self, credential: str) -> None:
        """Start ``credential``'s reload counts ("tls", "tokens") at 0, for a server that watches its files."""
        for outcome in ("loaded", "refused"):
            self.credential_reloads.labels(credential, outcome)

    def count_reload(self, credential: str, ok: bool) -> None:
        """One reading again of ``credential``'s changed files, taken or refused."""
        self.credential_reloads.labels(credential, "loaded" if ok else "refused").inc()

    def watch_galleries(self, store: GalleryBackend) -> None:
        """Export ``reid_gallery_entries{gallery}``, read from ``store`` at each scrape."""
        self.registry.register(_GalleryEntries(store))

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Start the metrics endpoint in a thread; returns its HTTP server (``shutdown()`` stops it)."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return httpd

    def value(self, name: str, **labels) -> float:
        """Current value of a sample (tests and benchmarks read figures without scraping HTTP)."""
        return self.registry.get_sample_value(name, labels) or 0.0


class _GalleryEntries:
    """A collector of each gallery's size, asked of the store when scraped rather than kept up to
    date by the calls: other replicas change a shared Milvus gallery too, and removals by person or
    time do not say which galleries' sizes changed. On Milvus a scrape counts each gallery's entries
    (one read each); a store that cannot answer leaves the family empty, not the scrape failed."""

    def __init__(self, store: GalleryBackend):
        self.store = store

    def describe(self):  # registering must not call collect: the store may be slow or down
        return [GaugeMetricFamily("reid_gallery_entries", "Entries in each gallery")]

    def collect(self):
        family = GaugeMetricFamily("reid_gallery_entries", "Entries in each gallery", labels=["gallery"])
        try:
            for info in self.store.list():
                family.add_metric([info.name], info.size)
        except GalleryError as exc:
            log.warning("metrics: cannot read the galleries' sizes: %s", exc)
        yield family


# How far ahead of the server's deadline a caller's cancel may arrive and still be its deadline:
# the caller's deadline runs out first by the time the call took to reach the server.
DEADLINE_SLACK_SECONDS = 0.1


@contextlib.contextmanager
def counting_bugs(metrics: ServerMetrics, method: str):
    """Around a call's work: an exception nothing expected (a bug; gRPC logs its traceback and
    answers UNKNOWN) is counted as UNKNOWN, so that alerts see it; a status the method gave with
    ``context.abort`` is its own to count."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception:
        metrics.count_call(method, "UNKNOWN")
        raise


def timed(rpc):
    """Decorates a unary RPC method of a servicer holding ``metrics``: its whole latency, whatever
    it ends with (an abort raises), goes into ``reid_request_seconds{method}``, named after it.

    A call whose deadline passes while it waits or runs, or whose caller cancels it, ends with gRPC
    cancelling the method: it returns no status of its own, so it is counted here, by which of the
    two it was (it went uncounted, and a deadline too short for the searches did not show). The
    caller's clock runs out a moment before the server's, and its cancel can arrive first: an end
    within ``DEADLINE_SLACK_SECONDS`` of the deadline counts as the deadline. An unexpected
    exception (a bug) counts as UNKNOWN, the status gRPC answers it with."""
    @functools.wraps(rpc)
    async def call(self, request, context):
        start = time.monotonic()
        try:
            with counting_bugs(self.metrics, rpc.__name__):
                return await rpc(self, request, context)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
                    else "CANCELLED")
            self.metrics.count_call(rpc.__name__, code)
            raise
        finally:
            self.metrics.request_seconds.labels(rpc.__name__).observe(time.monotonic() - start)
    return call
