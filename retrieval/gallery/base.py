"""The gallery backend interface and its value types (FAISS today; other stores implement the same).

A gallery holds L2-normalized embeddings (inner product = cosine) under stable 64-bit ids, each with
metadata: person/track id, camera id, timestamp and free-form labels.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np


class GalleryError(Exception):
    """A gallery request that cannot be served; ``code`` names the gRPC status it maps to."""

    code = "INTERNAL"


class GalleryNotFound(GalleryError):
    code = "NOT_FOUND"


class GalleryExists(GalleryError):
    code = "ALREADY_EXISTS"


class InvalidEntry(GalleryError):
    code = "INVALID_ARGUMENT"


class StorageError(GalleryError):
    """The gallery directory cannot be written (read-only, disk full): writes fail, reads go on."""

    code = "UNAVAILABLE"


@dataclass
class EntryMetadata:
    person_id: str = ""
    camera_id: str = ""
    timestamp: float = 0.0
    labels: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"person_id": self.person_id, "camera_id": self.camera_id, "timestamp": self.timestamp, "labels": dict(self.labels)}


@dataclass
class SearchFilter:
    """Conditions a hit must meet: not from ``exclude_camera_id``; timestamp within [time_from, time_to]
    (0 = open end); every ``labels`` key present with that value."""

    exclude_camera_id: str = ""
    time_from: float = 0.0
    time_to: float = 0.0
    labels: dict = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.exclude_camera_id or self.time_from or self.time_to or self.labels)

    def key(self) -> tuple:
        return (self.exclude_camera_id, self.time_from, self.time_to, tuple(sorted(self.labels.items())))


@dataclass
class RerankOptions:
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    pool: int = 100


@dataclass
class Hit:
    id: int
    score: float  # cosine similarity
    distance: float  # 1 - score, or the re-ranked distance
    metadata: EntryMetadata


@dataclass
class GalleryInfo:
    name: str
    dim: int
    size: int
    index_type: str
    backend: str
    device: str = "cpu"


INDEX_TYPES = ("flat", "hnsw")


class GalleryBackend(abc.ABC):
    """What the server needs from a gallery store. Every method is thread-safe."""

    @abc.abstractmethod
    def create(self, name: str, dim: int, index_type: str = "flat") -> GalleryInfo: ...

    @abc.abstractmethod
    def drop(self, name: str) -> None: ...

    @abc.abstractmethod
    def list(self) -> list[GalleryInfo]: ...

    @abc.abstractmethod
    def info(self, name: str) -> GalleryInfo: ...

    @abc.abstractmethod
    def add(self, name: str, ids: np.ndarray, vectors: np.ndarray, metadata: list[EntryMetadata], replace: bool = False) -> np.ndarray:
        """Store entries durably before returning their ids (0 in ``ids`` = assign one)."""

    @abc.abstractmethod
    def remove(self, name: str, ids: np.ndarray) -> tuple[int, list[int]]:
        """Returns (number removed, ids that were not there)."""

    @abc.abstractmethod
    def search(self, name: str, queries: np.ndarray, top_k: int, filters: list[SearchFilter],
               rerank: RerankOptions | None = None) -> list[list[Hit]]: ...

    def close(self) -> None:
        """Flush and release resources."""
