"""The gallery backend interface and its value types (FAISS today; other stores implement the same).

A gallery holds L2-normalized embeddings (inner product = cosine) under stable 64-bit ids, each with
metadata: person/track id, camera id, timestamp and free-form labels.
"""
from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass, field

import numpy as np

from retrieval.distance import NORM_EPS


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

    def matches(self, m: EntryMetadata) -> bool:
        return ((not self.exclude_camera_id or m.camera_id != self.exclude_camera_id)
                and (not self.time_from or m.timestamp >= self.time_from)
                and (not self.time_to or m.timestamp <= self.time_to)
                and all(m.labels.get(k) == v for k, v in self.labels.items()))


@dataclass
class RerankOptions:
    """k-reciprocal re-ranking of a candidate pool. By default each query is re-ranked alone, so
    its answer does not depend on what else its call asked; ``joint`` re-ranks the call's queries
    together, as offline evaluation does (Zhong et al.'s protocol)."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    pool: int = 100
    joint: bool = False
    # The most gallery items the call may gather for re-ranking (see pool_rerank.rerank_items);
    # None = no bound. The server sets it: items cost memory and CPU, k-reciprocal work grows with
    # their square.
    max_items: int | None = None


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
    model: str = ""  # the model whose embeddings it holds ("": not recorded)


@dataclass
class EntryPage:
    """Entries of a gallery in ascending id order, from ``GalleryBackend.entries``."""

    ids: np.ndarray  # int64
    metadata: list[EntryMetadata]
    vectors: np.ndarray | None  # float32 [len(ids), dim], L2-normalized; None unless asked for
    more: bool  # entries with higher ids (of the people asked for) follow


INDEX_TYPES = ("flat", "hnsw")
MAX_PAGE = 10_000  # entries in one page of ``entries``
MAX_ID = 2**63 - 1
# person_id and camera_id, in UTF-8 bytes: Milvus stores them as VARCHAR(512) and refused longer
# ones only at insert. The same limit holds for every backend, so moving a gallery keeps it valid.
MAX_TEXT_BYTES = 512
GALLERY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_new_gallery(name: str, dim: int, index_type: str, max_dim: int) -> None:
    if not GALLERY_NAME.match(name or ""):
        raise InvalidEntry(f"gallery name {name!r} must be 1-128 letters, digits, '_', '.' or '-'")
    if dim < 1 or dim > max_dim:
        raise InvalidEntry(f"dimension {dim} is out of range 1..{max_dim}")
    if index_type not in INDEX_TYPES:
        raise InvalidEntry(f"index type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")


def _check_directions(vectors: np.ndarray, what: str) -> None:
    """Refuse all-zero rows: normalizing one leaves zeros, whose cosine with every entry is 0, so a
    zero entry would turn up in searches at distance 1 and a zero query would return arbitrary hits.
    (An unset buffer sent by mistake is the usual cause.)"""
    zero = np.flatnonzero(np.linalg.norm(vectors.astype(np.float64), axis=1) < NORM_EPS)
    if len(zero):
        raise InvalidEntry(f"{what} {zero[0]} is all zeros ({len(zero)} of {len(vectors)}): it has no direction to compare")


def check_entries(gallery: str, dim: int, ids: np.ndarray, vectors: np.ndarray, metadata: list) -> np.ndarray:
    """Validate an add request (any backend); returns the ids as int64."""
    ids = np.asarray(ids, dtype=np.int64).copy()
    if len(ids) != len(vectors) or len(metadata) != len(vectors):
        raise InvalidEntry(f"{len(vectors)} vectors but {len(ids)} ids and {len(metadata)} metadata entries")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise InvalidEntry(f"gallery {gallery} holds {dim}-d embeddings, got {vectors.shape[-1]}-d")
    if not np.isfinite(vectors).all():
        raise InvalidEntry("embeddings contain NaN or inf")
    _check_directions(vectors, "embedding")
    odd = [i for i, m in enumerate(metadata) if not math.isfinite(m.timestamp)]
    if odd:  # it would never match a time filter, nor fail one
        raise InvalidEntry(f"entry {odd[0]} has timestamp {metadata[odd[0]].timestamp}; timestamps must be finite")
    for i, m in enumerate(metadata):
        for what in ("person_id", "camera_id"):
            size = len(getattr(m, what).encode())
            if size > MAX_TEXT_BYTES:
                raise InvalidEntry(f"entry {i}: {what} is {size} bytes long; at most {MAX_TEXT_BYTES} (UTF-8)")
    if (ids < 0).any():
        raise InvalidEntry(f"ids must be between 1 and {MAX_ID}")
    given = ids[ids > 0]
    if len(np.unique(given)) != len(given):
        raise InvalidEntry("the request repeats an id")
    return ids


def check_people(person_ids: list[str], action: str = "remove") -> list[str]:
    """The distinct person ids of a removal (or a listing), in order; an empty one would mean
    "every entry without a person id", which nobody asks for by leaving a field blank."""
    if any(not p for p in person_ids):
        raise InvalidEntry(f"person ids to {action} must not be empty")
    return list(dict.fromkeys(person_ids))


def check_page(after_id: int, limit: int, person_ids: list[str], flt: SearchFilter | None) -> list[str]:
    """Validate a page request of ``entries``; returns its distinct person ids (empty: everyone)."""
    if flt is not None:
        check_filter(flt)
    if not 0 <= after_id <= MAX_ID:
        raise InvalidEntry(f"after_id must be within 0..2^63-1, got {after_id}")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidEntry(f"page size must be within 1..{MAX_PAGE}, got {limit}")
    return check_people(person_ids, "list")


def check_cutoff(timestamp: float) -> float:
    if not (math.isfinite(timestamp) and timestamp > 0):
        raise InvalidEntry(f"before_timestamp must be a time above 0, got {timestamp}")
    return float(timestamp)


def check_queries(gallery: str, dim: int, queries: np.ndarray, filters: list, top_k: int) -> list:
    """Validate a search (any backend); returns one filter per query."""
    if top_k < 1:
        raise InvalidEntry("top_k must be at least 1")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InvalidEntry(f"gallery {gallery} holds {dim}-d embeddings, got {queries.shape[-1]}-d queries")
    if not np.isfinite(queries).all():
        raise InvalidEntry("query embeddings contain NaN or inf")
    _check_directions(queries, "query embedding")
    filters = list(filters) or [SearchFilter()]
    if len(filters) not in (1, len(queries)):
        raise InvalidEntry(f"give one filter for all queries or one per query, got {len(filters)} for {len(queries)}")
    for i, f in enumerate(filters):
        check_filter(f, f"filter {i}")
    return filters * len(queries) if len(filters) == 1 else filters


def check_filter(f: SearchFilter, what: str = "filter") -> None:
    if not (math.isfinite(f.time_from) and math.isfinite(f.time_to)):  # NaN matched nothing, silently
        raise InvalidEntry(f"{what}: time_from and time_to must be finite, got {f.time_from} and {f.time_to}")
    if f.time_from and f.time_to and f.time_from > f.time_to:
        # an empty window is a swapped pair far more often than an intended "match nothing"
        raise InvalidEntry(f"{what}: time_from {f.time_from} is after time_to {f.time_to}")


class GalleryBackend(abc.ABC):
    """What the server needs from a gallery store. Every method is thread-safe."""

    location: str = ""  # where the galleries are, for the startup log: a folder, a Milvus address
    # seconds the store took to load its galleries when it opened (for the startup log, to size a
    # startup probe by); None where opening loads nothing (a Milvus server holds them)
    load_seconds: float | None = None

    @abc.abstractmethod
    def create(self, name: str, dim: int, index_type: str = "flat", model: str = "") -> GalleryInfo:
        """A new empty gallery; ``model`` names the model whose embeddings it will hold."""

    @abc.abstractmethod
    def drop(self, name: str) -> None: ...

    @abc.abstractmethod
    def list(self) -> list[GalleryInfo]: ...

    @abc.abstractmethod
    def info(self, name: str) -> GalleryInfo: ...

    def dimensions(self) -> dict[str, int]:
        """Each gallery's embedding width: what a startup check needs of ``list``, without the rest
        (a Milvus store counts every gallery's entries there, a Strong read each)."""
        return {g.name: g.dim for g in self.list()}

    def models(self) -> dict[str, str]:
        """Each gallery's model ("" where none was recorded), as cheaply as ``dimensions``."""
        return {g.name: g.model for g in self.list()}

    def model(self, name: str) -> str:
        """The model whose embeddings gallery ``name`` holds: checked before images are embedded for it."""
        return self.info(name).model

    @abc.abstractmethod
    def add(self, name: str, ids: np.ndarray, vectors: np.ndarray, metadata: list[EntryMetadata], replace: bool = False) -> np.ndarray:
        """Store entries durably before returning their ids (0 in ``ids`` = assign one)."""

    @abc.abstractmethod
    def remove(self, name: str, ids: np.ndarray) -> tuple[int, list[int]]:
        """Returns (number removed, ids that were not there)."""

    @abc.abstractmethod
    def remove_people(self, name: str, person_ids: list[str]) -> tuple[int, list[str]]:
        """Every entry carrying one of ``person_ids`` (a request to forget someone), in one durable
        change. Returns (number removed, the person ids no entry carried)."""

    @abc.abstractmethod
    def remove_before(self, name: str, timestamp: float) -> int:
        """Every entry whose timestamp is set (above 0) and earlier than ``timestamp`` (a retention
        period), in one durable change, as ``remove_people`` does. Returns how many were removed."""

    @abc.abstractmethod
    def entries(self, name: str, after_id: int = 0, limit: int = 1000, person_ids: list[str] = (),
                with_vectors: bool = False, flt: SearchFilter | None = None) -> EntryPage:
        """Up to ``limit`` entries with ids above ``after_id``, the lowest first; only those of
        ``person_ids`` when given, and those ``flt`` keeps (as a search's filter would). Paging by
        id, not by offset, keeps a listing whole while entries come and go between pages: each
        entry present throughout is listed once."""

    @abc.abstractmethod
    def get(self, name: str, ids: np.ndarray) -> EntryPage:
        """The entries of ``ids`` that the gallery holds, with their vectors, in the order given
        (an id it does not hold is left out)."""

    @abc.abstractmethod
    def search(self, name: str, queries: np.ndarray, top_k: int, filters: list[SearchFilter],
               rerank: RerankOptions | None = None, group_by_person: bool = False) -> list[list[Hit]]:
        """Each query's best hits. With ``group_by_person``, the best entry of each of ``top_k``
        distinct people (``retrieval.gallery.grouping``); re-ranked, those drawn from the pool."""

    def close(self) -> None:
        """Flush and release resources."""
