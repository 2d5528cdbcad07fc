"""Python clients (sync and asyncio) for the ReIdentification service."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

import grpc
import numpy as np

from serving.proto import reid_pb2, reid_pb2_grpc

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
    arr = np.ascontiguousarray(item, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"raw images must be H x W x 3 uint8, got {arr.shape}")
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


class ReidClient:
    """Blocking client. ``embed`` raises ``grpc.RpcError`` for call-level failures."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 30.0, max_message_bytes: int = 64 * 2**20):
        opts = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = grpc.insecure_channel(target, options=opts)
        self.stub = reid_pb2_grpc.ReIdentificationStub(self.channel)
        self.timeout = timeout

    def embed(self, images: Sequence[ImageInput] = (), frame: ImageInput | None = None, boxes=(), **kw) -> list[EmbedOutcome]:
        return parse_response(self.stub.Embed(build_request(images, frame, boxes, **kw), timeout=self.timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncReidClient:
    """asyncio client; use ``async with AsyncReidClient(target) as c: await c.embed([...])``."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout: float | None = 30.0, max_message_bytes: int = 64 * 2**20):
        opts = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = grpc.aio.insecure_channel(target, options=opts)
        self.stub = reid_pb2_grpc.ReIdentificationStub(self.channel)
        self.timeout = timeout

    async def embed(self, images: Sequence[ImageInput] = (), frame: ImageInput | None = None, boxes=(), **kw) -> list[EmbedOutcome]:
        return parse_response(await self.stub.Embed(build_request(images, frame, boxes, **kw), timeout=self.timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
