"""Gallery RPCs of the ReIdentification service, over any ``GalleryBackend``.

Store calls block (fsync, FAISS), so they run in a thread pool; the stores keep concurrent adds
and searches consistent (a FAISS gallery runs its searches side by side and each change alone).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from retrieval.gallery import EntryMetadata, EntryPage, GalleryError, GalleryInfo, RerankOptions, SearchFilter
from retrieval.gallery.base import MAX_ID
from serving.image_errors import error_message, image_status
from serving.metrics import timed
from serving.proto import reid_pb2
from serving.security import CALLER_ROLE
from serving.threads import run_for_caller
from serving.wire import embedding_message

log = logging.getLogger(__name__)

_INDEX_NAMES = {reid_pb2.INDEX_TYPE_UNSPECIFIED: "flat", reid_pb2.FLAT: "flat", reid_pb2.HNSW: "hnsw"}
_INDEX_ENUMS = {"flat": reid_pb2.FLAT, "hnsw": reid_pb2.HNSW}
DEFAULT_PAGE = 1000  # ListEntries' page size when none is asked for
# A ListEntries page's room for entries: under gRPC's default limit on received messages, which
# other clients than ours keep (an answer above it fails in the client, not here).
PAGE_BYTES = 4 * 2**20 - 1024
# Largest rerank.k1 and k2: the k-reciprocal expansion works on (k1 + 1)^2 x k1/2 cells per item,
# so a k1 of 1,000 kept a 5,000-entry gallery's search busy for over ten minutes. The paper's
# values are 20 and 6.
MAX_RERANK_K = 100
# Gallery failures that are the server's, not the caller's (a full disk, a store that cannot be
# reached): logged, since the caller alone would see them otherwise; one message at most once a
# minute, as every write fails alike while a disk stays full.
FAULT_CODES = frozenset({"INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
FAULT_LOG_SECONDS = 60.0


def _info(info: GalleryInfo) -> reid_pb2.GalleryInfo:
    return reid_pb2.GalleryInfo(name=info.name, dimension=info.dim, size=info.size,
                                index_type=_INDEX_ENUMS.get(info.index_type, reid_pb2.INDEX_TYPE_UNSPECIFIED),
                                backend=info.backend, device=info.device, model=info.model)


def _meta(m: reid_pb2.EntryMetadata) -> EntryMetadata:
    return EntryMetadata(m.person_id, m.camera_id, m.timestamp, dict(m.labels))


def _meta_message(m: EntryMetadata) -> reid_pb2.EntryMetadata:
    return reid_pb2.EntryMetadata(person_id=m.person_id, camera_id=m.camera_id, timestamp=m.timestamp, labels=m.labels)


def _filter(f: reid_pb2.SearchFilter) -> SearchFilter:
    return SearchFilter(f.exclude_camera_id, f.time_from, f.time_to, dict(f.labels))


class GalleryRpcs:
    """Mixed into the service; needs ``store``, ``gallery_pool``, ``gallery_capacity`` (calls that may
    wait for or run in that pool), ``limits``, ``metrics``, ``engine`` and ``embed_outcomes``."""

    store = None
    gallery_pool: ThreadPoolExecutor | None = None
    _gallery_calls = 0  # waiting for or running in the gallery pool
    _fault_logged: tuple[str, float] = ("", float("-inf"))  # the last server-side failure logged, and when
    _faults_unlogged = 0  # failures left out of the log since then

    async def _call(self, context, method: str, fn, *args):
        if self.store is None:
            # UNIMPLEMENTED, not UNAVAILABLE: nothing transient, so a client's retry policy must not retry it
            await self._fail(context, method, grpc.StatusCode.UNIMPLEMENTED,
                             "galleries are off on this server (reid-serve --no-gallery)")
        if self._gallery_calls >= self.gallery_capacity:
            await self._fail(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"{self._gallery_calls} gallery calls are waiting or running, the server's limit "
                             f"(--gallery-queue-capacity); retry with backoff")
        store_seconds = self.metrics.stage_seconds.labels("gallery")
        start = time.monotonic()
        self._gallery_calls += 1
        self.metrics.gallery_calls.inc()
        try:  # a caller that goes meanwhile: a search stops at its next step
            result = await run_for_caller(self.gallery_pool, fn, *args)
        except GalleryError as exc:
            store_seconds.observe(time.monotonic() - start)  # before the caller can see the failure
            await self._gallery_failed(context, method, exc)
        finally:
            self._gallery_calls -= 1
            self.metrics.gallery_calls.dec()
        store_seconds.observe(time.monotonic() - start)
        self._count(method, grpc.StatusCode.OK)
        return result

    async def _fail(self, context, method: str, code: grpc.StatusCode, message: str):
        self._count(method, code)
        await context.abort(code, message)

    async def _gallery_failed(self, context, method: str, exc: GalleryError):
        if exc.code in FAULT_CODES:
            self._log_fault(method, str(exc))
        await self._fail(context, method, grpc.StatusCode[exc.code], str(exc))

    def _log_fault(self, method: str, message: str) -> None:
        """Log a server-side gallery failure, unless the same one was logged less than
        FAULT_LOG_SECONDS ago; the next line logged says how many were left out."""
        now = time.monotonic()
        last, logged_at = self._fault_logged
        if message == last and now - logged_at < FAULT_LOG_SECONDS:
            self._faults_unlogged += 1
            return
        unlogged = (f" ({self._faults_unlogged} gallery failure(s) since the last line left out of the log)"
                    if self._faults_unlogged else "")
        log.warning("%s failed: %s%s", method, message, unlogged)
        self._fault_logged, self._faults_unlogged = (message, now), 0

    async def _embed_images(self, images, context, method: str, gallery: str) -> tuple[list, list]:
        """Embed request images through the batcher for ``gallery``, once it is known to hold this
        model's embeddings; returns (rows for good images, per-image exceptions)."""
        from serving.service import RequestError

        if self.store is not None:
            try:
                theirs = await asyncio.get_running_loop().run_in_executor(self.gallery_pool, self.store.model, gallery)
            except GalleryError as exc:
                await self._gallery_failed(context, method, exc)
            ours = self.engine.model_id
            if theirs and ours and theirs != ours:
                await self._fail(context, method, grpc.StatusCode.FAILED_PRECONDITION,
                                 f"gallery {gallery!r} holds embeddings of model {theirs}, and this server embeds images "
                                 f"with model {ours}: they do not compare. Enroll the images again into a new gallery, "
                                 "or search this one with embeddings of its own model")

        try:
            outcomes = await self.embed_outcomes(reid_pb2.EmbedRequest(images=images), self._deadline(context))
        except RequestError as exc:
            await self._fail(context, method, exc.code, exc.message)
        rows = [None if isinstance(o, Exception) else o for o in outcomes]
        errors = [o if isinstance(o, Exception) else None for o in outcomes]
        return rows, errors

    @timed
    async def CreateGallery(self, request, context):
        dim = request.dimension or self.engine.metadata.embedding_dim
        if self.store is not None and request.index_type not in _INDEX_NAMES:  # a newer client's: not silently flat
            await self._fail(context, "CreateGallery", grpc.StatusCode.INVALID_ARGUMENT,
                             f"index_type {request.index_type} is not one this server knows (FLAT = 1, HNSW = 2)")
        # a gallery of another width than the model's holds embeddings from elsewhere: no model to record
        model = self.engine.model_id if dim == self.engine.metadata.embedding_dim else ""
        info = await self._call(context, "CreateGallery", self.store.create if self.store else None,
                                request.name, dim, _INDEX_NAMES.get(request.index_type, ""), model)
        return _info(info)

    @timed
    async def DropGallery(self, request, context):
        await self._call(context, "DropGallery", self.store.drop if self.store else None, request.name)
        return reid_pb2.DropGalleryResponse()

    @timed
    async def ListGalleries(self, request, context):
        infos = await self._call(context, "ListGalleries", self.store.list if self.store else None)
        return reid_pb2.ListGalleriesResponse(galleries=[_info(i) for i in infos])

    @timed
    async def GetGalleryInfo(self, request, context):
        return _info(await self._call(context, "GetGalleryInfo", self.store.info if self.store else None, request.name))

    @timed
    async def AddToGallery(self, request, context):
        method = "AddToGallery"
        if bool(request.images) == bool(request.embeddings):
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, "give either images or embeddings (exactly one)")
        n = len(request.images) or len(request.embeddings)
        if len(request.metadata) not in (0, n) or len(request.ids) not in (0, n):
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{n} entries need {n} metadata and {n} ids (or none), got {len(request.metadata)} and {len(request.ids)}")
        if request.images:
            rows, errors = await self._embed_images(request.images, context, method, request.gallery)
            bad = [(i, e) for i, e in enumerate(errors) if e is not None]
            if bad:
                i, e = bad[0]
                await self._fail(context, method, image_status(e),
                                 f"image {i}: {e} ({len(bad)} of {n} images unusable; nothing was added)")
            vectors = np.stack(rows)
        else:
            lengths = {len(e.values) for e in request.embeddings}
            if len(lengths) != 1:
                await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, f"embeddings have mismatched lengths {sorted(lengths)}")
            vectors = np.asarray([e.values for e in request.embeddings], dtype=np.float32)
        ids = np.asarray(list(request.ids) or [0] * n, dtype=np.uint64)
        if (ids > np.uint64(MAX_ID)).any():
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, "ids must be below 2^63")
        meta = [_meta(m) for m in request.metadata] or [EntryMetadata() for _ in range(n)]
        out = await self._call(context, method, self.store.add if self.store else None, request.gallery,
                               ids.astype(np.int64), vectors, meta, request.replace_existing)
        return reid_pb2.AddToGalleryResponse(ids=[int(i) for i in out])

    @timed
    async def RemoveFromGallery(self, request, context):
        method = "RemoveFromGallery"
        if sum(map(bool, (request.ids, request.person_ids, request.before_timestamp))) > 1:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, "give one of ids, person_ids and before_timestamp")
        if request.before_timestamp:
            removed = await self._call(context, method, self.store.remove_before if self.store else None,
                                       request.gallery, request.before_timestamp)
            return reid_pb2.RemoveFromGalleryResponse(removed=removed)
        if request.person_ids:
            removed, missing_people = await self._call(context, method, self.store.remove_people if self.store else None,
                                                       request.gallery, list(request.person_ids))
            return reid_pb2.RemoveFromGalleryResponse(removed=removed, missing_person_ids=missing_people)
        removed, missing = await self._call(context, method, self.store.remove if self.store else None,
                                            request.gallery, np.asarray(list(request.ids), dtype=np.uint64).astype(np.int64))
        return reid_pb2.RemoveFromGalleryResponse(removed=removed, missing=missing)

    @timed
    async def Search(self, request, context):
        method = "Search"
        if sum(map(bool, (request.images, request.embeddings, request.entry_ids))) != 1:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             "give query images, query embeddings or query entry_ids (exactly one)")
        n = len(request.images) or len(request.embeddings) or len(request.entry_ids)
        if n > self.limits.max_search_queries:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{n} queries; the limit is {self.limits.max_search_queries}")
        top_k = request.top_k or 10
        if top_k > self.limits.max_top_k:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, f"top_k {top_k} exceeds the limit {self.limits.max_top_k}")
        if n * top_k > self.limits.max_search_hits:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             f"{n} queries x top_k {top_k} = {n * top_k:,} hits; the limit is {self.limits.max_search_hits:,} "
                             f"(max_search_hits): send fewer queries per call or lower top_k")
        if len(request.filters) not in (0, 1, n):
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             f"give no filter, one, or one per query ({n}); got {len(request.filters)}")
        r = request.rerank
        lambda_value = r.lambda_value if r.HasField("lambda_value") else 0.3  # 0 is a choice: the Jaccard distance alone
        rerank = (RerankOptions(r.k1 or 20, r.k2 or 6, lambda_value, r.pool or 100, r.joint, self.limits.max_rerank_items)
                  if r.enabled else None)
        if rerank and not 0.0 <= rerank.lambda_value <= 1.0:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, "rerank.lambda_value must be within 0..1")
        if rerank and max(rerank.k1, rerank.k2) > MAX_RERANK_K:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             f"rerank.k1 ({rerank.k1}) and k2 ({rerank.k2}) may be at most {MAX_RERANK_K}")
        filters = [_filter(f) for f in request.filters] or [SearchFilter()]
        errors: list = [None] * n  # per query: None, or its Error message
        entry_ids = np.asarray(list(request.entry_ids), dtype=np.uint64)
        if (entry_ids > np.uint64(MAX_ID)).any():
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, "entry ids must be below 2^63")
        if request.images:
            rows, failures = await self._embed_images(request.images, context, method, request.gallery)
            errors = [error_message(e) if e is not None else None for e in failures]
            good = [i for i, e in enumerate(errors) if e is None]
            queries = np.stack([rows[i] for i in good]) if good else None
        elif request.entry_ids:
            good, queries = [], None  # the entries' vectors are read in the gallery pool
        else:
            lengths = {len(e.values) for e in request.embeddings}
            if len(lengths) != 1:
                await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, f"embeddings have mismatched lengths {sorted(lengths)}")
            good = list(range(n))
            queries = np.asarray([e.values for e in request.embeddings], dtype=np.float32)

        def answer() -> reid_pb2.SearchResponse:
            # in the gallery pool: answers of many hits took tens of milliseconds to build (16
            # queries x 1,000 hits: 44 ms), which the event loop, and every Embed, waited for
            usable, vectors = (_entry_queries(self.store, request.gallery, entry_ids.astype(np.int64), errors)
                               if request.entry_ids else (good, queries))
            query_filters = filters if len(filters) == 1 else [filters[i] for i in usable]
            hits = self.store.search(request.gallery, vectors, top_k, query_filters, rerank,
                                     request.group_by_person) if usable else []
            return _search_response(n, errors, dict(zip(usable, hits)))

        return await self._call(context, method, answer if self.store else None)

    @timed
    async def ListEntries(self, request, context):
        if request.include_embeddings and CALLER_ROLE.get() != "write":
            await self._fail(context, "ListEntries", grpc.StatusCode.PERMISSION_DENIED,
                             "listing embeddings (a gallery's biometric templates) needs a write token; "
                             "this token may list entries without them")
        flt = _filter(request.filter) if request.HasField("filter") else None

        def listing() -> reid_pb2.ListEntriesResponse:  # in the gallery pool: a page's messages took 40-170 ms to build
            return _entries_response(self.store.entries(request.gallery, request.after_id, request.page_size or DEFAULT_PAGE,
                                                        list(request.person_ids), request.include_embeddings, flt))

        return await self._call(context, "ListEntries", listing if self.store else None)


def _entry_queries(store, gallery: str, ids: np.ndarray, errors: list) -> tuple[list[int], np.ndarray | None]:
    """Queries given as entry ids: (the queries whose entries the gallery holds, their vectors);
    each other query's error is set in ``errors`` (NOT_FOUND)."""
    held = store.get(gallery, ids)
    row = {entry: r for r, entry in enumerate(held.ids.tolist())}
    good, rows = [], []
    for q, entry in enumerate(ids.tolist()):
        if entry in row:
            good.append(q)
            rows.append(row[entry])
        else:
            errors[q] = reid_pb2.Error(code=grpc.StatusCode.NOT_FOUND.value[0], message=f"no entry {entry} in gallery {gallery!r}")
    return good, held.vectors[rows] if good else None


def _search_response(n: int, errors: list, found: dict) -> reid_pb2.SearchResponse:
    """One result per query: its error (an unusable image, an entry not held), or the hits ``found`` for it."""
    response = reid_pb2.SearchResponse()
    for i in range(n):
        result = response.results.add()
        if errors[i] is not None:
            result.error.CopyFrom(errors[i])
            continue
        for h in found.get(i, []):
            result.hits.add(id=h.id, score=h.score, distance=h.distance, metadata=_meta_message(h.metadata))
    return response


def _entries_response(page: EntryPage) -> reid_pb2.ListEntriesResponse:
    """A page as its answer, cut where it would pass PAGE_BYTES (one entry always goes, or the
    listing could not go on); ``next_after_id`` says where the next page starts."""
    response = reid_pb2.ListEntriesResponse()
    room = PAGE_BYTES
    for i, (entry_id, meta) in enumerate(zip(page.ids.tolist(), page.metadata)):
        entry = reid_pb2.GalleryEntry(id=entry_id, metadata=_meta_message(meta))
        if page.vectors is not None:
            entry.embedding.CopyFrom(embedding_message(page.vectors[i]))
        room -= entry.ByteSize() + 6  # its field tag and length
        if room < 0 and response.entries:
            response.next_after_id = response.entries[-1].id
            return response
        response.entries.append(entry)
    if page.more:
        response.next_after_id = response.entries[-1].id
    return response
