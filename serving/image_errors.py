"""One image's failure as it travels: a status code and an ``Error`` message in its result.

Server-side only (the client library reads ``Error`` messages and needs none of this).
"""
from __future__ import annotations

import grpc

from serving.engines.base import ImageError
from serving.proto import reid_pb2


def image_status(exc: Exception) -> grpc.StatusCode:
    """INVALID_ARGUMENT for an image the caller should not send again as is (``ImageError``),
    INTERNAL for what went wrong in the model (``NonFiniteEmbedding``)."""
    return grpc.StatusCode.INVALID_ARGUMENT if isinstance(exc, ImageError) else grpc.StatusCode.INTERNAL


def error_message(exc: Exception) -> reid_pb2.Error:
    """One image's ``Error``, with ``image_status``'s code."""
    return reid_pb2.Error(code=image_status(exc).value[0], message=str(exc))
