"""Python clients (sync and asyncio) for the ReIdentification service."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence, Union

import grpc
import numpy as np

from serving.proto import reid_pb2, reid_pb2_grpc
from serving.targets import check_target
from serving.wire import embedding_message

ImageInput = Union[bytes, str, Path, np.ndarray]


@dataclass
class EmbedOutcome:
    """One image's answer: ``embedding`` or (``error_code``, ``error``)."""

    embedding: np.ndarray | None = None
    error_code: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.embedding is not None


def to_image(item: ImageInput, bgr: bool = False) -> reid_pb2.Image:
    """Encoded bytes, a file path, or an H x W x 3 uint8 array (RGB, or BGR with ``bgr=True``)."""
    if isinstance(item, (str, Path)):
        return reid_pb2.Image(encoded=Path(item).read_bytes())
    if isinstance(item, bytes):
        return reid_pb2.Image(encoded=item)
    if not isinstance(item, np.ndarray):
        raise TypeError(f"an image is a file path, encoded bytes or an H x W x 3 uint8 array; got {type(item).__name__}")
    if item.dtype != np.uint8:  # casting would turn a 0..1 float image into zeros and embed those
        hint = " (from 0..1 floats: (img * 255).round().astype(np.uint8))" if item.dtype.kind == "f" else ""
        raise ValueError(f"raw images must be H x W x 3 uint8, got dtype {item.dtype}{hint}")
    if item.ndim != 3 or item.shape[2] != 3:
        raise ValueError(f"raw images must be H x W x 3 uint8, got shape {item.shape}")
    arr = np.ascontiguousarray(item)
    fmt = reid_pb2.BGR8 if bgr else reid_pb2.RGB8
    return reid_pb2.Image(raw=reid_pb2.RawImage(pixels=arr.tobytes(), height=arr.shape[0], width=arr.shape[1], format=fmt))


def build_request(images: Sequence[ImageInput] = (), frame: ImageInput | None = None,
                  boxes: Iterable[Sequence[float]] = (), request_id: str = "", bgr: bool = False) -> reid_pb2.EmbedRequest:
    request = reid_pb2.EmbedRequest(images=[to_image(i, bgr) for i in images], request_id=request_id)
    if frame is not None:
        request.frame.image.CopyFrom(to_image(frame, bgr))
        for x1, y1, x2, y2 in boxes:
            request.frame.boxes.add(x1=x1, y1=y1, x2=x2, y2=y2)
    return request


def parse_response(response: reid_pb2.EmbedResponse) -> list[EmbedOutcome]:
    out = []
    for r in response.results:
        if r.WhichOneof("result") == "embedding":
            out.append(EmbedOutcome(embedding=np.asarray(r.embedding.values, dtype=np.float32)))
        else:
            out.append(EmbedOutcome(error_code=r.error.code, error=r.error.message))
    return out


# Calls that change nothing, so that sending one again cannot do anything twice. Writes are never
# retried for the caller: an add with ids the server assigns would add its entries twice.
RETRIED_METHODS = ("Embed", "Search", "ListEntries", "ListGalleries", "GetGalleryInfo")


def service_config(retries: int) -> str:
    """The channel's gRPC service config.

    Calls are balanced one by one over every address the target resolves to (``round_robin``): a
    Kubernetes headless Service's name, or ``ipv4:HOST:PORT,HOST:PORT``. gRPC's default,
    ``pick_first``, sent every call to one replica.

    With ``retries``, ``RETRIED_METHODS`` are sent up to that many more times on RESOURCE_EXHAUSTED
    (the server's queue was full) and UNAVAILABLE (a server shutting down or not reachable yet), with
    exponential backoff and jitter (gRPC's own retries, within the call's deadline). Retry
    throttling stops retrying while most calls fail, so that an overloaded server is not sent more.
    """
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries:
        policy = {"maxAttempts": retries + 1, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                  "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"]}
        names = [{"service": "reid.v1.ReIdentification", "method": m} for m in RETRIED_METHODS]
        config.update(methodConfig=[{"name": names, "retryPolicy": policy}],
                      retryThrottling={"maxTokens": 10, "tokenRatio": 0.1})
    return json.dumps(config)


class _Connection:
    """Channel options shared by the clients: message size, TLS (CA, optional client pair, the name
    to check the server's certificate against), token, keepalive, retries.

    ``retries`` (default 2) is how many more times a call that changes nothing is sent after
    RESOURCE_EXHAUSTED or UNAVAILABLE (``service_config``); 0 turns retrying off. gRPC allows at most
    4 more.

    ``keepalive_seconds`` makes the channel ping the server that often while it is idle, also with
    no call open, so that a proxy or NAT that drops idle connections does not silently break a
    long-lived stream. reid-serve accepts pings 10 s apart or more (``--min-client-ping-seconds``);
    a server that accepts fewer ends the connection with GOAWAY "too_many_pings".
    """

    def __init__(self, target: str, timeout: float | None, max_message_bytes: int, token: str | None = None,
                 root_certificates: bytes | None = None, client_cert: bytes | None = None, client_key: bytes | None = None,
                 keepalive_seconds: float | None = None, retries: int = 2, tls_server_name: str | None = None,
                 aio: bool = False):
        if not 0 <= retries <= 4:
            raise ValueError(f"retries must be within 0..4 (gRPC makes at most 5 attempts), got {retries}")
        check_target(target)
        opts = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.enable_retries", int(retries > 0)), ("grpc.service_config", service_config(retries))]
        if keepalive_seconds:
            opts += [("grpc.keepalive_time_ms", int(keepalive_seconds * 1000)), ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.max_pings_without_data", 0)]  # keep pinging through idle spells
        if tls_server_name:  # a server called by an address its certificate does not hold (an IP, a proxy's name)
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        mod = grpc.aio if aio else grpc
        if root_certificates or client_cert:
            creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self.channel = mod.secure_channel(target, creds, options=opts)
        else:
            self.channel = mod.insecure_channel(target, options=opts)
        self.stub = reid_pb2_grpc.ReIdentificationStub(self.channel)
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _kw(self) -> dict:
        return {"timeout": self.timeout, "metadata": self.metadata}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ReidClient(_Connection):
    """Blocking client. ``embed`` raises ``grpc.RpcError`` for call-level failures."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 30.0, max_message_bytes: int = 64 * 2**20, **options):
        super().__init__(target, timeout, max_message_bytes, **options)

    def embed(self, images: Sequence[ImageInput] = (), frame: ImageInput | None = None, boxes=(), **kw) -> list[EmbedOutcome]:
        return parse_response(self.embed_response(images, frame, boxes, **kw))

    def embed_response(self, images: Sequence[ImageInput] = (), frame: ImageInput | None = None, boxes=(),
                       **kw) -> reid_pb2.EmbedResponse:
        """As ``embed``, the whole answer: with its ``model_id`` too (``parse_response`` gives the outcomes)."""
        return self.stub.Embed(build_request(images, frame, boxes, **kw), **self._kw())

    def embed_stream(self, batches: Iterable[Sequence[ImageInput]], timeout: float | None = None) -> Iterator[list[EmbedOutcome]]:
        """One long-lived EmbedStream: each item of ``batches`` (e.g. one frame's crops) is one request;
        answers come back in order. Cheaper per message than unary calls (docs/performance.md).
        ``timeout`` bounds the whole stream (default: none)."""
        requests = (build_request(images) for images in batches)
        for response in self.stub.EmbedStream(requests, timeout=timeout, metadata=self.metadata):
            yield parse_response(response)


class _AsyncConnection(_Connection):
    """An asyncio channel, opened and closed with ``async with``."""

    async def close(self) -> None:
        await self.channel.close()

    def __enter__(self):
        # the inherited one would "close" with a coroutine nobody awaits, leaving the channel open
        raise TypeError(f"{type(self).__name__} is an asyncio client: use 'async with {type(self).__name__}(...) as client'")

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class AsyncReidClient(_AsyncConnection):
    """asyncio client; use ``async with AsyncReidClient(target) as c: await c.embed([...])``."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 30.0, max_message_bytes: int = 64 * 2**20, **options):
        super().__init__(target, timeout, max_message_bytes, aio=True, **options)

    async def embed(self, images: Sequence[ImageInput] = (), frame: ImageInput | None = None, boxes=(), **kw) -> list[EmbedOutcome]:
        return parse_response(await self.stub.Embed(build_request(images, frame, boxes, **kw), **self._kw()))

    async def embed_stream(self, batches: AsyncIterable[Sequence[ImageInput]] | Iterable[Sequence[ImageInput]],
                           timeout: float | None = None) -> AsyncIterator[list[EmbedOutcome]]:
        """As ``ReidClient.embed_stream``; ``batches`` may be an async iterable (e.g. a frame queue)."""

        async def requests():
            if isinstance(batches, AsyncIterable):
                async for images in batches:
                    yield build_request(images)
            else:
                for images in batches:
                    yield build_request(images)

        async for response in self.stub.EmbedStream(requests(), timeout=timeout, metadata=self.metadata):
            yield parse_response(response)


def metadata_message(person_id: str = "", camera_id: str = "", timestamp: float = 0.0, labels: dict | None = None):
    return reid_pb2.EntryMetadata(person_id=person_id, camera_id=camera_id, timestamp=timestamp, labels=labels or {})


def embeddings_message(vectors) -> list:
    return [embedding_message(v) for v in vectors]


def create_request(name: str, dimension: int = 0, index_type: str = "flat") -> reid_pb2.CreateGalleryRequest:
    index = {"flat": reid_pb2.FLAT, "hnsw": reid_pb2.HNSW}.get(index_type.lower())
    if index is None:  # a bare KeyError named only the value
        raise ValueError(f"index_type must be 'flat' or 'hnsw', not {index_type!r}")
    return reid_pb2.CreateGalleryRequest(name=name, dimension=dimension, index_type=index)


def add_request(gallery: str, images: Sequence[ImageInput] = (), embeddings=None, metadata: Sequence = (),
                ids: Sequence[int] = (), replace: bool = False) -> reid_pb2.AddToGalleryRequest:
    request = reid_pb2.AddToGalleryRequest(gallery=gallery, images=[to_image(i) for i in images], metadata=list(metadata),
                                           ids=list(ids), replace_existing=replace)
    if embeddings is not None:
        request.embeddings.extend(embeddings_message(embeddings))
    return request


def remove_request(gallery: str, ids: Sequence[int] = (), person_ids: Sequence[str] = (),
                   before_timestamp: float = 0.0) -> reid_pb2.RemoveFromGalleryRequest:
    """Entries by id, every entry of ``person_ids``, or every entry whose timestamp is set and
    before ``before_timestamp`` (one of the three)."""
    return reid_pb2.RemoveFromGalleryRequest(gallery=gallery, ids=list(ids), person_ids=list(person_ids),
                                             before_timestamp=before_timestamp)


def search_request(gallery: str, images: Sequence[ImageInput] = (), embeddings=None, top_k: int = 10,
                   filters: Sequence = (), rerank: dict | None = None, group_by_person: bool = False,
                   entry_ids: Sequence[int] = ()) -> reid_pb2.SearchRequest:
    """Queries as ``images``, ``embeddings`` or the gallery's own ``entry_ids`` (one of the three);
    ``group_by_person``: the best entry of each of ``top_k`` people; ``rerank``: RerankOptions fields ({} = defaults)."""
    request = reid_pb2.SearchRequest(gallery=gallery, images=[to_image(i) for i in images], top_k=top_k,
                                     filters=list(filters), group_by_person=group_by_person, entry_ids=list(entry_ids))
    if embeddings is not None:
        request.embeddings.extend(embeddings_message(embeddings))
    if rerank is not None:
        request.rerank.CopyFrom(reid_pb2.RerankOptions(enabled=True, **rerank))
    return request


def entries_request(gallery: str, person_ids: Sequence[str] = (), include_embeddings: bool = False, page_size: int = 0,
                    after_id: int = 0, filter: reid_pb2.SearchFilter | None = None) -> reid_pb2.ListEntriesRequest:
    """``filter``: only the entries it keeps, as a search's filter would."""
    return reid_pb2.ListEntriesRequest(gallery=gallery, person_ids=list(person_ids), include_embeddings=include_embeddings,
                                       page_size=page_size, after_id=after_id, filter=filter)


class GalleryClient(_Connection):
    """Blocking client for the gallery RPCs; failures raise ``grpc.RpcError``."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 60.0, max_message_bytes: int = 256 * 2**20, **options):
        super().__init__(target, timeout, max_message_bytes, **options)

    def create(self, name: str, dimension: int = 0, index_type: str = "flat") -> reid_pb2.GalleryInfo:
        return self.stub.CreateGallery(create_request(name, dimension, index_type), **self._kw())

    def drop(self, name: str) -> None:
        self.stub.DropGallery(reid_pb2.DropGalleryRequest(name=name), **self._kw())

    def list(self) -> list:
        return list(self.stub.ListGalleries(reid_pb2.ListGalleriesRequest(), **self._kw()).galleries)

    def info(self, name: str) -> reid_pb2.GalleryInfo:
        return self.stub.GetGalleryInfo(reid_pb2.GetGalleryInfoRequest(name=name), **self._kw())

    def add(self, gallery: str, images: Sequence[ImageInput] = (), embeddings=None, metadata: Sequence = (),
            ids: Sequence[int] = (), replace: bool = False) -> list[int]:
        return list(self.stub.AddToGallery(add_request(gallery, images, embeddings, metadata, ids, replace), **self._kw()).ids)

    def remove(self, gallery: str, ids: Sequence[int] = (), person_ids: Sequence[str] = (),
               before_timestamp: float = 0.0) -> reid_pb2.RemoveFromGalleryResponse:
        """``remove_request`` says what is removed."""
        return self.stub.RemoveFromGallery(remove_request(gallery, ids, person_ids, before_timestamp), **self._kw())

    def search(self, gallery: str, images: Sequence[ImageInput] = (), embeddings=None, top_k: int = 10,
               filters: Sequence = (), rerank: dict | None = None, group_by_person: bool = False,
               entry_ids: Sequence[int] = ()) -> list:
        """One ``SearchResult`` per query (``search_request`` says what the options mean)."""
        request = search_request(gallery, images, embeddings, top_k, filters, rerank, group_by_person, entry_ids)
        return list(self.stub.Search(request, **self._kw()).results)

    def entries(self, gallery: str, person_ids: Sequence[str] = (), include_embeddings: bool = False,
                page_size: int = 0, filter: reid_pb2.SearchFilter | None = None) -> Iterator[reid_pb2.GalleryEntry]:
        """Every entry of the gallery (only those of ``person_ids`` and those ``filter`` keeps, when
        given), lowest id first, a page per call (``page_size`` 0: the server's default)."""
        after = 0
        while True:
            request = entries_request(gallery, person_ids, include_embeddings, page_size, after, filter)
            page = self.stub.ListEntries(request, **self._kw())
            yield from page.entries
            if not page.next_after_id:
                return
            after = page.next_after_id


class AsyncGalleryClient(_AsyncConnection):
    """asyncio client for the gallery RPCs (``async with AsyncGalleryClient(target) as g: await g.search(...)``),
    with ``GalleryClient``'s methods and arguments; failures raise ``grpc.aio.AioRpcError``."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 60.0, max_message_bytes: int = 256 * 2**20, **options):
        super().__init__(target, timeout, max_message_bytes, aio=True, **options)

    async def create(self, name: str, dimension: int = 0, index_type: str = "flat") -> reid_pb2.GalleryInfo:
        return await self.stub.CreateGallery(create_request(name, dimension, index_type), **self._kw())

    async def drop(self, name: str) -> None:
        await self.stub.DropGallery(reid_pb2.DropGalleryRequest(name=name), **self._kw())

    async def list(self) -> list:
        return list((await self.stub.ListGalleries(reid_pb2.ListGalleriesRequest(), **self._kw())).galleries)

    async def info(self, name: str) -> reid_pb2.GalleryInfo:
        return await self.stub.GetGalleryInfo(reid_pb2.GetGalleryInfoRequest(name=name), **self._kw())

    async def add(self, gallery: str, images: Sequence[ImageInput] = (), embeddings=None, metadata: Sequence = (),
                  ids: Sequence[int] = (), replace: bool = False) -> list[int]:
        return list((await self.stub.AddToGallery(add_request(gallery, images, embeddings, metadata, ids, replace),
                                                  **self._kw())).ids)

    async def remove(self, gallery: str, ids: Sequence[int] = (), person_ids: Sequence[str] = (),
                     before_timestamp: float = 0.0) -> reid_pb2.RemoveFromGalleryResponse:
        return await self.stub.RemoveFromGallery(remove_request(gallery, ids, person_ids, before_timestamp), **self._kw())

    async def search(self, gallery: str, images: Sequence[ImageInput] = (), embeddings=None, top_k: int = 10,
                     filters: Sequence = (), rerank: dict | None = None, group_by_person: bool = False,
                     entry_ids: Sequence[int] = ()) -> list:
        request = search_request(gallery, images, embeddings, top_k, filters, rerank, group_by_person, entry_ids)
        return list((await self.stub.Search(request, **self._kw())).results)

    async def entries(self, gallery: str, person_ids: Sequence[str] = (), include_embeddings: bool = False,
                      page_size: int = 0, filter: reid_pb2.SearchFilter | None = None) -> AsyncIterator[reid_pb2.GalleryEntry]:
        """``async for entry in g.entries(...)``: as ``GalleryClient.entries``."""
        after = 0
        while True:
            request = entries_request(gallery, person_ids, include_embeddings, page_size, after, filter)
            page = await self.stub.ListEntries(request, **self._kw())
            for entry in page.entries:
                yield entry
            if not page.next_after_id:
                return
            after = page.next_after_id
