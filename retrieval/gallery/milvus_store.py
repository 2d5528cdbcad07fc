"""Milvus gallery backend: the same galleries and calls as the FAISS store, in a Milvus collection.

``uri`` is a local file path (Milvus Lite, in process: tests and single machines) or
``http(s)://host:port`` (a Milvus server or cluster, with ``token`` and TLS options), so several
reid-serve replicas can share one gallery.

One collection per gallery, named ``reid_`` + the gallery name in hex (Milvus names allow only
letters, digits and '_'); the collection description holds the gallery name. Fields: ``id``
(INT64 primary key), ``vector`` (FLOAT_VECTOR, L2-normalized, metric IP = cosine),
``person_id``/``camera_id`` (VARCHAR), ``timestamp`` (DOUBLE), ``labels`` (JSON). Filters become
Milvus boolean expressions.

Consistency: searches run at ``consistency`` ("strong" by default: a search sees every add
acknowledged before it, by any replica). On a Milvus server Strong waits for the next time tick
(sent every 200 ms), about 300 ms per search here; "bounded" answers at once but may miss what
other replicas added in the last seconds, "session" sees this client's own writes at once. Reads
that decide a write (does this id exist?) are always Strong.

What an acknowledged add means: Milvus accepted the insert and ``flush`` returned, so the rows
are persisted (Milvus Lite: in its database file; a Milvus server: sealed segments in its object
storage). Ids the server assigns (id 0 in a request) are random 63-bit values, since Milvus has
no atomic counter shared by replicas.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading

import numpy as np

from retrieval.cancellation import check_cancelled
from retrieval.distance import l2_normalize
from retrieval.gallery.base import (
    MAX_ID, EntryMetadata, EntryPage, GalleryBackend, GalleryError, GalleryExists, GalleryInfo, GalleryNotFound,
    Hit, InvalidEntry, RerankOptions, SearchFilter, StorageError, check_cutoff, check_entries, check_new_gallery,
    check_page, check_people, check_queries,
)
from retrieval.gallery.grouping import search_by_person
from retrieval.gallery.pool_rerank import pool_rerank

log = logging.getLogger(__name__)
# Milvus Lite gives the query iterator no session timestamp, so pymilvus warned of falling back to
# the client's clock on every page that ListEntries read: noise in a server's log, as each page is
# read by an iterator of its own. (pymilvus 3 names the logger so; 2.x has the iterator elsewhere.)
for _name in ("pymilvus.client.iterator.query_iterator", "pymilvus.orm.iterator"):
    logging.getLogger(_name).addFilter(lambda record: "failed to get mvccTs" not in record.getMessage())


def _not_a_method_milvus_lite_lacks(record: logging.LogRecord) -> bool:
    """Milvus Lite (3.x) serves pymilvus from a gRPC server in this process and leaves some of
    Milvus's methods to the generated stubs' ``NotImplementedError``. pymilvus asks for one
    (AllocTimestamp, while it waits for a new collection's index) and goes on without it, but gRPC
    logged each such call as an ERROR with a traceback: one in reid-serve's log per CreateGallery.
    Any other error of that server still logs."""
    error = record.exc_info[1] if record.exc_info else None
    if not isinstance(error, NotImplementedError):
        return True
    last = error.__traceback__
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    return last is None or not last.tb_frame.f_code.co_filename.endswith("_pb2_grpc.py")


logging.getLogger("grpc._server").addFilter(_not_a_method_milvus_lite_lacks)  # the asyncio server logs elsewhere
PREFIX = "reid_"
CONSISTENCY_LEVELS = {"strong": "Strong", "bounded": "Bounded", "session": "Session", "eventually": "Eventually"}
META_FIELDS = ["person_id", "camera_id", "timestamp", "labels"]
HNSW_PARAMS = {"M": 32, "efConstruction": 80}
MAX_LIMIT = 16384  # the most hits Milvus returns for one query (its topk limit)
# Bytes of vectors one fetch by ids asks for: a Milvus server refuses answers over its 64 MiB
# message limit, and results over 16,384 rows; a re-ranked search of 64 queries fetches about
# 130,000 entries (275 MB at 512-d).
FETCH_BYTES = 16 * 2**20
# Hits (with their metadata, some 60 bytes each) one search call asks for: queries go in groups of
# at most this many hits, for the same limits (a re-ranked search's neighbour search sends
# thousands of queries at once).
SEARCH_HITS = 2**18
MODEL_PROPERTY = "reid.model"  # the collection property naming the gallery's model (descriptions come back empty)
# Milvus's default limit on collection names (proxy.maxNameLength): with the prefix and two hex
# digits per character, gallery names up to 125 characters fit.
MAX_COLLECTION_NAME = 255
MAX_NAME = (MAX_COLLECTION_NAME - len(PREFIX)) // 2


# How long a reconnect waits for Milvus: calls that lost the connection wait for it meanwhile.
RECONNECT_SECONDS = 3.0
# Calls that change data: never repeated after a lost connection (the first attempt may have landed).
WRITES = frozenset({"insert", "upsert", "delete", "create_collection", "drop_collection"})


def _collection_missing(exc: Exception) -> bool:
    """Whether Milvus said the collection does not exist (dropped, e.g. through another replica)."""
    from pymilvus.exceptions import ErrorCode

    return getattr(exc, "code", None) == ErrorCode.COLLECTION_NOT_FOUND


def _connection_lost(exc: Exception) -> bool:
    """Whether ``exc`` says Milvus could not be reached, as opposed to refusing the request."""
    import grpc
    from pymilvus import MilvusUnavailableException
    from pymilvus.client.types import Status

    if isinstance(exc, MilvusUnavailableException) or getattr(exc, "code", None) == Status.CONNECT_FAILED:
        return True
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


def _collection(name: str) -> str:
    return PREFIX + name.encode().hex()


def _gallery_name(collection: str) -> str | None:
    """The gallery a collection holds; None for collections that are not ours."""
    if not collection.startswith(PREFIX):
        return None
    try:
        return bytes.fromhex(collection[len(PREFIX):]).decode()
    except ValueError:
        return None


def _quote(value: str) -> str:
    """``value`` as a double-quoted Milvus string literal.

    Milvus's expression parser knows backslash escapes such as \\n and \\", but not JSON's \\uXXXX,
    which json.dumps writes for every non-ASCII or control character: a filter on a camera
    named "entrée" failed. Only what would end the literal is escaped; everything else goes raw.
    """
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _any_person(people: list[str]) -> str:
    """The Milvus expression for entries of any of ``people``."""
    return f"person_id in [{', '.join(map(_quote, people))}]"


def _entry_metadata(row: dict) -> EntryMetadata:
    return EntryMetadata(row["person_id"], row["camera_id"], row["timestamp"], dict(row["labels"] or {}))


def _deleted(result) -> int:
    """How many entries a delete removed: a server answers with a count, Milvus Lite with their ids."""
    return int(result["delete_count"]) if isinstance(result, dict) else len(result)


def filter_expression(flt: SearchFilter) -> str:
    """A SearchFilter as a Milvus boolean expression ("" = no condition)."""
    terms = []
    if flt.exclude_camera_id:
        terms.append(f"camera_id != {_quote(flt.exclude_camera_id)}")
    if flt.time_from:
        terms.append(f"timestamp >= {float(flt.time_from)!r}")
    if flt.time_to:
        terms.append(f"timestamp <= {float(flt.time_to)!r}")
    for key, value in sorted(flt.labels.items()):
        terms.append(f"labels[{_quote(key)}] == {_quote(value)}")
    return " and ".join(terms)


def _require_milvus_lite() -> None:
    """pymilvus answers any ImportError from Milvus Lite with "milvus-lite is required ... pip install
    pymilvus[milvus_lite]", also when it is installed but one of its own imports fails (pyarrow
    built for NumPy 2 beside NumPy 1.26): the user then reinstalls what is there. Say which."""
    try:
        import milvus_lite.server_manager  # noqa: F401 - what pymilvus imports for a .db file
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("milvus_lite", "milvus_lite.server_manager"):
            raise GalleryError("a Milvus Lite file (.db) needs milvus-lite (pip install '.[milvus]')") from None
        raise GalleryError(f"milvus-lite is installed but cannot be imported: {' '.join(str(exc).split())}") from None


class MilvusGalleryStore(GalleryBackend):
    def __init__(self, uri: str, token: str = "", consistency: str = "strong", **client_kwargs):
        if consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"Milvus consistency must be one of {', '.join(CONSISTENCY_LEVELS)}, not {consistency!r}")
        self.consistency = CONSISTENCY_LEVELS[consistency]
        try:
            import pymilvus
            from pymilvus import MilvusClient
        except ImportError:
            raise GalleryError("the Milvus backend needs pymilvus (pip install '.[milvus]')") from None
        if uri.endswith(".db"):  # pymilvus's test for a Milvus Lite file
            _require_milvus_lite()
        self._connect_args = dict(uri=uri, token=token, **client_kwargs)
        if int(pymilvus.__version__.split(".")[0]) >= 3:
            # pymilvus 3 shares one connection among clients of the same address; a store of its own
            # can replace a broken one (in 2.x every client has its own connection anyway).
            self._connect_args["dedicated"] = True
        try:
            self.client = MilvusClient(**self._connect_args)
        except Exception as exc:  # noqa: BLE001 - connection errors come in several types
            # pymilvus words a refused token or an unverifiable certificate as "server unavailable" too
            raise StorageError(f"cannot connect to Milvus at {uri} (is it up? are the token and CA right?): {exc}") from None
        self.uri = uri
        self.location = f"Milvus at {uri}"
        # Held by writes, whose existence check and insert must not interleave within a replica.
        # Searches and counts do not take it: at Strong consistency each waits for Milvus's next
        # time tick (about 300 ms on a server), and under the lock concurrent searches queued
        # behind one another.
        self.lock = threading.RLock()
        self._connect_lock = threading.Lock()
        self._dims: dict[str, tuple[int, str]] = {}
        self._models: dict[str, str] = {}  # each gallery's model, read with its dimension

    # ---- helpers -------------------------------------------------------------------------------
    def _call(self, method: str, *args, what: str = "", **kwargs):
        """``self.client.<method>(...)``; a Milvus error becomes StorageError (UNAVAILABLE), naming
        ``what`` was done (the method's name by default).

        When the connection was lost (Milvus restarted or was unreachable), the client is made
        anew: the old one's gRPC channel waits out its reconnect backoff, which grows to 2 minutes,
        so a replica stayed unavailable that long after Milvus was back (seen with a Milvus 2.3.5
        server). A read is then tried once more; a write is not, since it may have been applied:
        its caller gets UNAVAILABLE and may retry. While Milvus stays unreachable each call tries
        to connect again, for at most RECONNECT_SECONDS.
        """
        what = what or method
        client = self.client or self._reconnect(None)
        try:
            return getattr(client, method)(*args, **kwargs)
        except GalleryError:
            raise
        except Exception as exc:  # noqa: BLE001 - MilvusException and transport errors
            if not _connection_lost(exc):
                raise self._failure(what, exc, args) from None
            failure = exc
        client = self._reconnect(client)
        if method in WRITES:
            raise StorageError(f"Milvus {what} failed, connection lost: {failure}; reconnected, retry the call")
        try:
            return getattr(client, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise self._failure(what, exc, args) from None

    def _failure(self, what: str, exc: Exception, args: tuple) -> GalleryError:
        """NOT_FOUND for a collection dropped behind this replica's back, whose description it had
        cached (it answered UNAVAILABLE, which clients retry, until a restart); else UNAVAILABLE."""
        name = _gallery_name(args[0]) if args and isinstance(args[0], str) else None
        if name is not None and _collection_missing(exc):
            self._dims.pop(name, None)
            return GalleryNotFound(f"no gallery named {name!r} (it was dropped)")
        return StorageError(f"Milvus {what} failed: {exc}")

    def _reconnect(self, failed) -> "object":
        """Replace ``failed`` (None: no client yet) with a new client that has a connection of its
        own, and return it. Calls that failed together reconnect once: the first to get here
        replaces the client, the others use its replacement."""
        from pymilvus import MilvusClient

        with self._connect_lock:
            if self.client is not None and self.client is not failed:
                return self.client
            old, self.client = self.client, None
            if old is not None:
                try:
                    old.close()
                except Exception:  # noqa: BLE001 - closing a broken client may fail too
                    pass
            try:
                self.client = MilvusClient(**self._connect_args, timeout=RECONNECT_SECONDS)
            except Exception as exc:  # noqa: BLE001 - self.client stays None: the next call tries again
                raise StorageError(f"cannot reconnect to Milvus at {self.uri}: {exc}") from None
            log.warning("reconnected to Milvus at %s", self.uri)
            return self.client

    def _describe(self, name: str, fresh: bool = False) -> tuple[int, str]:
        """The gallery's dimension and index type, cached; ``fresh`` reads them again (another
        replica may have dropped the gallery and made a new one of that name)."""
        if name in self._dims and not fresh:
            return self._dims[name]
        coll = _collection(name)
        if not self._call("has_collection", coll):
            raise GalleryNotFound(f"no gallery named {name!r}")
        desc = self._call("describe_collection", coll)
        dim = next(int(f["params"]["dim"]) for f in desc["fields"] if f["name"] == "vector")
        # from the index itself: the schema's description, where this was kept, came back empty
        # from Milvus Lite, so every HNSW gallery read as flat (and searched without its ef)
        built = self._call("describe_index", coll, index_name="vector")
        index = "hnsw" if str(built.get("index_type", "")).upper() == "HNSW" else "flat"
        self._call("load_collection", coll)
        self._dims[name] = (dim, index)
        self._models[name] = str((desc.get("properties") or {}).get(MODEL_PROPERTY, ""))
        return dim, index

    def _describe_for(self, name: str, width: int) -> tuple[int, str]:
        """As ``_describe``, read again when ``width`` is not the cached dimension, so that a gallery
        another replica made anew with another dimension is not judged by the old one."""
        dim, index_type = self._describe(name)
        return self._describe(name, fresh=True) if width != dim else (dim, index_type)

    def _count(self, name: str) -> int:
        rows = self._call("query", _collection(name), filter="", output_fields=["count(*)"],
                          consistency_level=self.consistency, what="count")
        return int(rows[0]["count(*)"])

    def _get(self, name: str, ids: list[int], fields: list[str], consistency: str, per_call: int | None = None) -> list[dict]:
        """The rows of ``ids`` the gallery holds, ``per_call`` ids a call (default MAX_LIMIT): a
        Milvus server answers at most MAX_LIMIT rows, and at most 64 MiB."""
        per_call = per_call or MAX_LIMIT
        rows: list[dict] = []
        for start in range(0, len(ids), per_call):
            rows += self._call("get", _collection(name), ids=ids[start:start + per_call], output_fields=fields,
                               consistency_level=consistency)
        return rows

    def _existing(self, name: str, ids: list[int]) -> set[int]:
        """Which of ``ids`` the gallery holds, read at Strong: it decides whether a write clashes, never stale."""
        return {int(r["id"]) for r in self._get(name, ids, ["id"], "Strong")}

    # ---- GalleryBackend ------------------------------------------------------------------------
    def create(self, name: str, dim: int, index_type: str = "flat", model: str = "") -> GalleryInfo:
        from pymilvus import DataType, MilvusClient

        check_new_gallery(name, dim, index_type, max_dim=32768)
        if len(name) > MAX_NAME:  # Milvus would refuse the collection, a retryable UNAVAILABLE
            raise InvalidEntry(f"gallery name {name[:20]!r}... is {len(name)} characters; Milvus galleries allow at most {MAX_NAME}")
        with self.lock:
            coll = _collection(name)
            if self._call("has_collection", coll):
                raise GalleryExists(f"gallery {name!r} already exists")
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                description=json.dumps({"name": name, "index_type": index_type}))
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("person_id", DataType.VARCHAR, max_length=512)
            schema.add_field("camera_id", DataType.VARCHAR, max_length=512)
            schema.add_field("timestamp", DataType.DOUBLE)
            schema.add_field("labels", DataType.JSON)
            index = self.client.prepare_index_params()
            if index_type == "hnsw":
                index.add_index(field_name="vector", index_type="HNSW", metric_type="IP", params=HNSW_PARAMS)
            else:
                index.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
            self._call("create_collection", coll, schema=schema, index_params=index,
                       consistency_level="Strong", properties={MODEL_PROPERTY: model} if model else None)
            self._dims[name] = (dim, index_type)
            self._models[name] = model
            return GalleryInfo(name, dim, 0, index_type, "milvus", model=model)

    def drop(self, name: str) -> None:
        with self.lock:
            self._describe(name)
            self._call("drop_collection", _collection(name))
            self._dims.pop(name, None)

    def _names(self) -> list[str]:
        names = [_gallery_name(coll) for coll in self._call("list_collections")]
        return sorted(n for n in names if n is not None)

    def list(self) -> list[GalleryInfo]:
        return [self.info(n) for n in self._names()]

    def dimensions(self) -> dict[str, int]:
        return {n: self._describe(n, fresh=True)[0] for n in self._names()}

    def info(self, name: str) -> GalleryInfo:
        dim, index_type = self._describe(name, fresh=True)  # what Milvus holds now, not what this replica saw
        return GalleryInfo(name, dim, self._count(name), index_type, "milvus", model=self._models[name])

    def model(self, name: str) -> str:
        self._describe(name)
        return self._models[name]

    def models(self) -> dict[str, str]:
        names = self._names()
        for n in names:
            self._describe(n, fresh=True)
        return {n: self._models[n] for n in names}

    def add(self, name, ids, vectors, metadata, replace=False):
        with self.lock:
            vectors = np.asarray(vectors, dtype=np.float32)
            dim, _ = self._describe_for(name, vectors.shape[-1])
            ids = check_entries(name, dim, ids, vectors, metadata)
            given = [int(i) for i in ids if i > 0]
            if not replace:
                clash = sorted(self._existing(name, given))
                if clash:
                    raise GalleryExists(f"ids already in gallery {name}: {clash[:10]}; set replace to overwrite")
            free = ids == 0
            ids[free] = [secrets.randbelow(MAX_ID) + 1 for _ in range(int(free.sum()))]
            vectors = l2_normalize(vectors)
            rows = [{"id": int(i), "vector": v.tolist(), **m.to_dict()} for i, v, m in zip(ids, vectors, metadata)]
            coll = _collection(name)
            self._call("upsert" if replace else "insert", coll, rows)
            self._call("flush", coll)
            return ids

    def remove(self, name, ids):
        with self.lock:
            self._describe(name)
            ids = [int(i) for i in np.asarray(ids, dtype=np.int64)]
            present = self._existing(name, ids)
            if present:
                coll = _collection(name)
                self._call("delete", coll, ids=sorted(present))
                self._call("flush", coll)
            return len(present), [i for i in ids if i not in present]

    def remove_people(self, name, person_ids):
        """Deleted by a filter on the person ids, not by the ids a query found, so that an entry of
        theirs another replica adds meanwhile goes too (unless it lands after the delete)."""
        people = check_people(person_ids)
        with self.lock:
            self._describe(name)
            coll = _collection(name)
            found = {p for p in people if self._call("query", coll, filter=f"person_id == {_quote(p)}", output_fields=["id"],
                                                     limit=1, consistency_level="Strong")}
            if not found:
                return 0, people
            result = self._call("delete", coll, filter=_any_person(sorted(found)))
            self._call("flush", coll)
            return _deleted(result), [p for p in people if p not in found]

    def remove_before(self, name, timestamp):
        cutoff = check_cutoff(timestamp)
        with self.lock:
            self._describe(name)
            coll = _collection(name)
            result = self._call("delete", coll, filter=f"timestamp > 0 and timestamp < {cutoff!r}")
            self._call("flush", coll)
            return _deleted(result)

    def entries(self, name, after_id=0, limit=1000, person_ids=(), with_vectors=False, flt=None):
        people = check_page(after_id, limit, list(person_ids), flt)
        dim, _ = self._describe(name)
        coll = _collection(name)
        terms = [f"id > {int(after_id)}", _any_person(people) if people else "",
                 filter_expression(flt) if flt is not None else ""]
        expr = " and ".join(t for t in terms if t)
        # The iterator, not a query with a limit: that returns any ``limit`` matching rows, the
        # iterator the lowest ids. One more than asked tells whether more follow.
        batch = self._call("query_iterator", coll, batch_size=limit + 1, limit=limit + 1, filter=expr,
                           output_fields=["id", *META_FIELDS, *(["vector"] if with_vectors else [])],
                           consistency_level=self.consistency, what="list entries")
        try:
            rows = sorted(batch.next(), key=lambda r: int(r["id"]))
        except Exception as exc:  # noqa: BLE001 - as in _call
            raise self._failure("list entries", exc, (coll,)) from None
        finally:
            batch.close()
        more, rows = len(rows) > limit, rows[:limit]
        vectors = np.asarray([r["vector"] for r in rows], dtype=np.float32).reshape(len(rows), dim) if with_vectors else None
        return EntryPage(np.asarray([int(r["id"]) for r in rows], dtype=np.int64), [_entry_metadata(r) for r in rows],
                         vectors, more)

    def get(self, name, ids):
        dim, _ = self._describe(name)
        present, vectors, meta = self._fetch(name, np.asarray(ids, dtype=np.int64), dim)
        return EntryPage(present, meta, vectors, False)

    def _search(self, name: str, index_type: str, queries: np.ndarray, k: int, filters: list[SearchFilter]):
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        meta: dict[int, EntryMetadata] = {}
        groups: dict[str, list[int]] = {}
        for i, flt in enumerate(filters):
            groups.setdefault(filter_expression(flt), []).append(i)
        params = {"metric_type": "IP", **({"params": {"ef": max(64, k)}} if index_type == "hnsw" else {})}
        step = max(1, min(MAX_LIMIT, SEARCH_HITS // k))
        for expr, group in groups.items():
            for start in range(0, len(group), step):
                check_cancelled()
                rows = group[start:start + step]
                answers = self._call("search", _collection(name), data=queries[rows].tolist(), limit=k,
                                     filter=expr, output_fields=META_FIELDS, search_params=params,
                                     consistency_level=self.consistency)
                for row, hits in zip(rows, answers):
                    for j, hit in enumerate(hits):
                        ids[row, j], scores[row, j] = int(hit["id"]), float(hit["distance"])
                        meta[int(hit["id"])] = _entry_metadata(hit["entity"])
        return scores, ids, meta

    def _fetch(self, name: str, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, list[EntryMetadata]]:
        """The entries of ``ids`` still present: another replica may have removed some, or all
        (``dim`` shapes an empty answer), since the search that found them."""
        per_call = max(1, min(MAX_LIMIT, FETCH_BYTES // (4 * dim + 256)))  # 256: the metadata's share, roughly
        rows = self._get(name, [int(i) for i in ids], ["vector", *META_FIELDS], self.consistency, per_call)
        by_id = {int(r["id"]): r for r in rows}
        present = np.asarray([i for i in ids if int(i) in by_id], dtype=np.int64)
        ordered = [by_id[int(i)] for i in present]
        vectors = np.asarray([r["vector"] for r in ordered], dtype=np.float32).reshape(len(ordered), dim)
        return present, vectors, [_entry_metadata(r) for r in ordered]

    def search(self, name, queries, top_k, filters, rerank: RerankOptions | None = None, group_by_person: bool = False):
        # without self.lock: a search may run beside writes and other searches (see __init__)
        queries = np.asarray(queries, dtype=np.float32)
        dim, index_type = self._describe_for(name, queries.shape[-1])
        filters = check_queries(name, dim, queries, filters, top_k)
        queries = l2_normalize(queries)

        def hits(q, kk, flts) -> list[list[Hit]]:
            scores, ids, meta = self._search(name, index_type, q, min(kk, MAX_LIMIT), flts)
            return [[Hit(int(i), float(s), 1.0 - float(s), meta[int(i)]) for s, i in zip(srow, irow) if i >= 0]
                    for srow, irow in zip(scores, ids)]

        if rerank is None and not group_by_person:  # no count first: each read at Strong waits for a time tick of its own
            return hits(queries, top_k, filters)
        if rerank is None:  # a search that returns fewer hits than asked has seen every entry: no count needed
            return search_by_person(lambda rows, kk: hits(queries[rows], kk, [filters[r] for r in rows]),
                                    len(queries), top_k, MAX_LIMIT)
        live = self._count(name)
        if live == 0:
            return [[] for _ in queries]

        def search_fn(q, kk, flts):
            scores, ids, _ = self._search(name, index_type, q, min(kk, MAX_LIMIT), flts)
            return scores, ids

        return pool_rerank(queries, top_k, filters, rerank, min(live, MAX_LIMIT), search_fn,
                           lambda ids: self._fetch(name, ids, dim), group_by_person)

    def close(self) -> None:
        try:
            if self.client is not None:
                self.client.close()
        except Exception:  # noqa: BLE001
            pass
