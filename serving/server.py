"""Server assembly: engine warm-up, gRPC health and reflection, metrics endpoint, graceful shutdown.

Health reports NOT_SERVING until the engine is loaded and warmed, and again from the moment a
shutdown starts; SIGTERM/SIGINT turn health NOT_SERVING, keep the port open for
``shutdown_delay_seconds`` (so balancers notice), then refuse new calls, let in-flight ones finish
(up to ``grace_seconds``), and the process exits 0. An engine that fails several batches in a row
turns health NOT_SERVING until a batch works again (``unhealthy_after_failures``).
"""
from __future__ import annotations

import asyncio
import errno
import gc
import importlib.metadata
import logging
import signal
import socket
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import cv2
import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from retrieval.gallery import GalleryBackend
from serving.batcher import DynamicBatcher
from serving.engines.base import Engine, ModelFileError, first_line
from serving.metrics import ServerMetrics
from serving.proto import reid_pb2, reid_pb2_grpc
from serving.security import TokenAuthInterceptor, TokenTable, check_bind, server_credentials
from serving.service import Limits, ReIdentificationService

log = logging.getLogger(__name__)
_GALLERIES_NAMED = 20  # in the startup line; the rest are counted
SERVICE_NAME = reid_pb2.DESCRIPTOR.services_by_name["ReIdentification"].full_name


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0  # 0 = no metrics HTTP endpoint
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0  # as Triton's default: under load batches fill while the engine runs
    split_batch_ms: float = 250.0  # a full batch longer than this is shared among the instances
    queue_capacity: int = 1024
    workers: int = 2
    gallery_threads: int = 4  # gallery calls at once: searches of a FAISS gallery overlap, changes do not
    # Gallery calls that may wait for or hold one of those threads; beyond it RESOURCE_EXHAUSTED, as
    # for a full embedding queue (without it a burst from callers without deadlines queued without bound).
    gallery_queue_capacity: int = 256
    instances: int = 0  # engine runs in flight at once; 0 = the engine's choice (Engine.instances)
    batching: bool = True
    max_message_bytes: int = 64 * 2**20
    # gRPC binds with SO_REUSEPORT by default on Linux, so several servers can hold one port and the
    # kernel spreads connections among them: a second reid-serve started by mistake on a server's
    # port (with another model, or other galleries) silently took part of its callers. Off here, a
    # taken port is an error; on, it lets a new server start beside the old one before it stops.
    reuse_port: bool = False
    # Callers that keep a stream open through idle spells send keepalive pings (so that proxies and
    # NAT do not drop the connection). gRPC's server default treats pings closer than 5 minutes as
    # abuse and, after two, closes the connection with GOAWAY "too_many_pings", failing the open
    # streams with UNAVAILABLE. Pings at least this far apart are accepted, also with no call open.
    min_client_ping_seconds: float = 10.0
    # Clients balancing over a name's addresses (a Kubernetes headless Service) resolve it again
    # only when a connection closes, so replicas added later got none of their calls: past this age
    # a connection is closed (GOAWAY; calls in progress and open streams finish on it) and the next
    # call goes over a new one. 0: never (gRPC's default).
    max_connection_age_seconds: float = 0.0
    limits: Limits = field(default_factory=Limits)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    insecure: bool = False
    tokens: dict = field(default_factory=dict)  # token -> "read" | "write"; none here or in tokens_file = no authentication
    tokens_file: str = ""  # more tokens, one "TOKEN ROLE" a line; read again when the file changes
    grace_seconds: float = 10.0
    # After health turns NOT_SERVING, keep accepting calls this long so load balancers and health
    # probes see it before the port closes.
    shutdown_delay_seconds: float = 1.0
    # An engine that fails this many batches in a row is broken (a lost GPU context fails every
    # batch) rather than unlucky: health turns NOT_SERVING, so that balancers and orchestrators move
    # traffic to other replicas or restart this one, and a batch of one is tried every
    # engine_probe_seconds until one works, which turns it SERVING again. 0: never.
    unhealthy_after_failures: int = 3
    engine_probe_seconds: float = 5.0

    def __post_init__(self) -> None:
        for name, low, high in _RANGES:
            check_number(name, getattr(self, name), low, high, integer=isinstance(getattr(ServerConfig, name), int))
        if self.instances < 0:
            raise ValueError(f"instances (--instances) must be 0 (automatic) or more, got {self.instances}")
        if self.metrics_port and self.metrics_port == self.port:  # else "cannot serve metrics ...: Address already in use"
            raise ValueError(f"--metrics-port {self.metrics_port} is also --port: give the metrics their own port")
        for limit in fields(self.limits):
            check_number(limit.name, getattr(self.limits, limit.name), 1, None, integer=True)
        if self.limits.max_images_per_request > self.queue_capacity:
            # such a request could never be queued: RESOURCE_EXHAUSTED, which tells clients to retry, forever
            raise ValueError(f"max_images_per_request ({self.limits.max_images_per_request}) exceeds queue_capacity "
                             f"({self.queue_capacity}): raise --queue-capacity or lower --max-images-per-request")


# (option, lowest, highest) of ServerConfig's numbers: out of range, most of them started a server
# that refused every call (a queue or message limit of 0) or failed later with an unrelated message.
_RANGES = (("port", 0, 65535), ("metrics_port", 0, 65535), ("max_batch_size", 1, None), ("max_queue_delay_ms", 0, None),
           ("split_batch_ms", 0, None), ("queue_capacity", 1, None), ("workers", 1, None), ("gallery_threads", 1, None),
           ("gallery_queue_capacity", 1, None),
           ("max_message_bytes", 4096, None), ("min_client_ping_seconds", 0, None), ("max_connection_age_seconds", 0, None),
           ("grace_seconds", 0, None),
           ("shutdown_delay_seconds", 0, None), ("unhealthy_after_failures", 0, None), ("engine_probe_seconds", 0.01, None))


def _bind_failure(host: str, port: int, tls: bool) -> str:
    """Why ``host:port`` cannot be bound, and what to change: gRPC's failed bind gives no reason,
    so a plain socket tries the same address (a privileged port read as "taken" before)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host} does not resolve ({exc.strerror}); choose another --host"
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the port is taken (Address already in use); choose another --port, or stop what holds it"
                if exc.errno == errno.EACCES:
                    return (f"permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE; choose another "
                            f"--port ({exc.strerror})")
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host} is not an address of this machine; choose another --host ({exc.strerror})"
                return f"{exc.strerror or exc}; choose another --port or --host"
    tls_hint = "; gRPC may have refused the TLS files (its own message is above)" if tls else ""
    return f"gRPC refused it, though the address itself can be bound{tls_hint}"


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets: gRPC read ``--host ::1`` as a malformed address
    and the start failed as if the port were taken."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_number(name: str, value, low: float, high: float | None, integer: bool) -> None:
    """``value`` as option ``name`` must be: a number (a whole one if ``integer``) within [low, high]."""
    flag = "--" + name.replace("_", "-")
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} ({flag}) must be {'a whole number' if integer else 'a number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} ({flag}) must be {bounds}, got {value}")


class ReidServer:
    """One engine behind one gRPC port. ``await start()``, then ``await wait()`` or ``await stop()``."""

    def __init__(self, engine: Engine, config: ServerConfig, store: GalleryBackend | None = None):
        self.engine, self.config, self.store = engine, config, store
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = config.port
        self.batcher: DynamicBatcher | None = None
        self.service: ReIdentificationService | None = None
        self._shutdown: asyncio.Task | None = None  # once a stop has begun
        self._metrics_http = None  # the metrics HTTP server, while it runs
        self._failed_batches = 0  # engine failures in a row
        self._probe: asyncio.Task | None = None  # while the engine is deemed broken

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def start(self) -> int:
        c = self.config
        cv2.setNumThreads(0)  # sequential: preprocessing already runs on `workers` threads; a pool would contend
        opts = [("grpc.max_receive_message_length", c.max_message_bytes), ("grpc.max_send_message_length", c.max_message_bytes),
                ("grpc.http2.min_ping_interval_without_data_ms", int(c.min_client_ping_seconds * 1000)),
                ("grpc.keepalive_permit_without_calls", 1), ("grpc.so_reuseport", int(c.reuse_port))]
        if c.max_connection_age_seconds:
            opts.append(("grpc.max_connection_age_ms", int(c.max_connection_age_seconds * 1000)))
        creds = server_credentials(*(Path(p) if p else None for p in (c.tls_cert, c.tls_key, c.tls_client_ca)),
                                   on_reload=lambda ok: self.metrics.count_reload("tls", ok),
                                   on_certificate=self.metrics.tls_not_after.set)
        check_bind(c.host, creds is not None, c.insecure)
        tokens = TokenTable(c.tokens, Path(c.tokens_file) if c.tokens_file else None,
                            on_reload=lambda ok: self.metrics.count_reload("tokens", ok))
        interceptors = ([TokenAuthInterceptor(tokens, lambda method, code: self.metrics.count_call(method, code.name))]
                        if len(tokens) else [])
        if creds is not None:
            self.metrics.watch_reloads("tls")
        if c.tokens_file:
            self.metrics.watch_reloads("tokens")
        self.server = grpc.aio.server(options=opts, interceptors=interceptors)
        self.batcher = DynamicBatcher(self.engine, c.max_batch_size, c.max_queue_delay_ms / 1000, c.queue_capacity,
                                      c.batching, self.metrics, c.instances, c.split_batch_ms / 1000, self._batch_outcome)
        self.service = ReIdentificationService(self.engine, self.batcher, self.metrics, c.limits, c.workers, self.store,
                                               c.gallery_threads, c.gallery_queue_capacity)
        reid_pb2_grpc.add_ReIdentificationServicer_to_server(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._bind(creds)
        if self.store is not None:
            self.metrics.watch_galleries(self.store)
        if c.metrics_port:
            try:
                self._metrics_http = self.metrics.serve_http(c.metrics_port, c.host)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {c.host}:{c.metrics_port}: {exc.strerror or exc}; "
                              "choose another --metrics-port") from None
        await self.server.start()
        try:
            self.batcher.start()
            await self._warm_up()
        except BaseException:  # undo the start (ports, batcher, galleries) so the process can exit cleanly
            await self.stop(0)
            raise
        # Everything allocated so far (modules, the model, the gallery) lives as long as the process:
        # moved out of the collector's sight, a full collection under load no longer walks those
        # ~60,000 objects and stops the event loop for tens of milliseconds (docs/performance.md).
        gc.collect()
        gc.freeze()
        self._report_galleries()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        transport = ("mutual TLS" if c.tls_client_ca else "TLS") if creds else "plaintext"
        log.info("serving %s on %s (reid %s, model %s, %s x %d, max batch %d, queue delay %.1f ms, %s, %s, %s event loop)",
                 SERVICE_NAME, host_port(c.host, self.port), importlib.metadata.version("reid"), self.engine.model_id, self.engine.label,
                 self.batcher.instances, self.batcher.max_batch_size, c.max_queue_delay_ms, transport,
                 f"{len(tokens)} token(s)" if len(tokens) else "no authentication",
                 type(asyncio.get_running_loop()).__module__.split(".")[0])
        return self.port

    def _report_galleries(self) -> None:
        """Where the galleries are and which there are (the log said neither); and galleries made
        with another model (after a model change), which refuse this one's embeddings on every add
        and search from images: said at startup rather than per call."""
        if self.store is None:
            return
        dim, ours = self.engine.metadata.embedding_dim, self.engine.model_id
        widths = self.store.dimensions()
        names = sorted(widths)
        shown = ", ".join(names[:_GALLERIES_NAMED]) + (f", and {len(names) - _GALLERIES_NAMED} more"
                                                       if len(names) > _GALLERIES_NAMED else "")
        loaded = f", loaded in {self.store.load_seconds:.1f} s" if self.store.load_seconds is not None and names else ""
        log.info("galleries: %d, %s%s%s", len(names), self.store.location, f" ({shown})" if names else "", loaded)
        other = [f"{name} ({width}-d)" for name, width in widths.items() if width != dim]
        if other:
            log.warning("galleries of another width than this model's %d-d embeddings: %s; adding or searching "
                        "images there fails until they are rebuilt with this model", dim, ", ".join(other))
        other = [f"{name} (model {model})" for name, model in self.store.models().items()
                 if model and model != ours and widths.get(name) == dim]
        if other:
            log.warning("galleries filled by another model than this one (%s): %s; adding or searching images there "
                        "is refused (FAILED_PRECONDITION) until they are rebuilt with this model", ours, ", ".join(other))

    def _bind(self, creds) -> int:
        """The gRPC port, bound before anything starts so that a taken one is reported in one line."""
        c = self.config
        address = host_port(c.host, c.port)
        try:
            port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.5x raises where older releases returned 0
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address}: {_bind_failure(c.host, c.port, creds is not None)}")
        return port

    def _close_metrics_http(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def _warm_up(self) -> None:
        """Run the engine at the largest batch so the first caller does not pay for allocation, and on
        a GPU at every batch size the batcher can form, as each new size costs a first slow run there."""
        md = self.engine.metadata
        largest = self.batcher.max_batch_size
        each = self.engine.warm_each_batch_size
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        for n in range(1, largest + 1) if each else [largest]:
            batch = np.zeros((n, md.input_height, md.input_width, 3), dtype=np.uint8)
            try:
                await loop.run_in_executor(None, self.engine.run_pixels, batch)
            except ModelFileError:
                raise
            except Exception as exc:  # noqa: BLE001 - a runtime's own error types: the model cannot serve
                raise ModelFileError(f"the model failed its warm-up run at batch size {n}: {first_line(exc)}") from exc
        log.info("engine warmed at batch %s in %.1f s", f"sizes 1-{largest}" if each else f"size {largest}",
                 time.perf_counter() - start)

    @property
    def _engine_broken(self) -> bool:
        """The engine has failed ``unhealthy_after_failures`` batches in a row (never, at 0)."""
        limit = self.config.unhealthy_after_failures
        return bool(limit) and self._failed_batches >= limit

    def _batch_outcome(self, error: Exception | None) -> None:
        """On the event loop, after each batch: trip health after ``unhealthy_after_failures``
        failures in a row, and restore it at the next batch that works."""
        if error is None:
            if self._engine_broken and self._shutdown is None:
                log.warning("the engine works again: health SERVING")
                asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.SERVING))
            self._failed_batches = 0
            return
        self._failed_batches += 1
        limit = self.config.unhealthy_after_failures
        if self._failed_batches == 1:  # the first of a streak, so that a broken engine does not flood the log
            log.error("an engine batch failed: %s", first_line(error))
        if self._failed_batches == limit and self._shutdown is None:  # just tripped (never at limit 0)
            log.error("the engine failed %d batches in a row (last: %s): health NOT_SERVING, so that traffic goes to "
                      "other replicas; a batch of one is tried every %.0f s and turns it SERVING again once it works",
                      limit, first_line(error), self.config.engine_probe_seconds)
            asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._probe_engine())

    async def _probe_engine(self) -> None:
        """While the engine is deemed broken and no caller's batch shows otherwise, try it alone."""
        md = self.engine.metadata
        one = np.zeros((1, md.input_height, md.input_width, 3), dtype=np.uint8)
        while True:
            await asyncio.sleep(self.config.engine_probe_seconds)
            if not self._engine_broken or self._shutdown is not None:
                return  # a caller's batch worked meanwhile, or the server is stopping
            try:
                await self.batcher.probe(one)
            except Exception as exc:  # noqa: BLE001 - the runtime's own error types; still broken
                log.warning("engine probe failed: %s", first_line(exc))
                continue
            self._batch_outcome(None)
            return

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, finish in-flight ones, stop (a second call returns at once)."""
        if self._shutdown is not None:
            return
        self._shutdown = asyncio.ensure_future(self._shut_down(grace))
        await self._shutdown

    async def _shut_down(self, grace: float | None) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._probe is not None:
            self._probe.cancel()
        if grace is None or grace > 0:
            await asyncio.sleep(self.config.shutdown_delay_seconds)
        if self.service is not None:
            self.service.close_streams()  # streams never end by themselves: end them once what they read is answered
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        await self.batcher.stop()
        self._close_metrics_http()
        if self.store is not None:
            self.store.close()  # snapshots every gallery; the logs already hold every acknowledged change
        log.info("server stopped")

    async def wait(self) -> None:
        """Until the server has stopped. The gRPC port closes before the batcher drains and the
        galleries are snapshotted, so a stop in progress is awaited to its end (the process must
        not exit, cancelling it, in between), and its failure is raised here."""
        await self.server.wait_for_termination()
        if self._shutdown is not None:
            await self._shutdown

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT drain and stop. SIGHUP, by daemon custom "reload", ended the process at
        once (its default action), calls in flight and all: it now only says what reloads by itself."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: (log.info("received %s: draining", s.name),
                                                        asyncio.ensure_future(self.stop())))
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info(
            "received SIGHUP: nothing to do; the TLS and tokens files are read again when they change (within a "
            "second), and a new model or other settings need a restart"))


async def serve_forever(engine: Engine, config: ServerConfig, store: GalleryBackend | None = None) -> None:
    server = ReidServer(engine, config, store)
    await server.start()
    server.install_signal_handlers()
    await server.wait()
