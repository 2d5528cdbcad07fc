"""FAISS galleries on local disk that survive crashes: named galleries under one folder, each
searched in memory and kept on disk as a snapshot plus a write-ahead log (``faiss_snapshot``).

In memory a gallery's FAISS index holds every row (node i is row i) and the only copy of its
vectors; removed rows stay in it, marked dead and skipped by searches, until a snapshot compacts
them. Searches of a gallery run side by side; changes run one at a time, logged beside searches
and applied alone (an HNSW gallery's add in parts, with searches let in between).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from retrieval.cancellation import check_cancelled
from retrieval.distance import l2_normalize
from retrieval.faiss_setup import import_faiss
from retrieval.gallery.base import (
    INDEX_TYPES, EntryMetadata, EntryPage, GalleryBackend, GalleryError, GalleryExists, GalleryInfo, GalleryNotFound,
    Hit, RerankOptions, SearchFilter, StorageError, check_cutoff, check_entries, check_new_gallery, check_page,
    check_people, check_queries,
)
from retrieval.gallery.columns import Coded, Column
from retrieval.gallery.faiss_snapshot import FORMAT, Persistence, storage_error
from retrieval.gallery.grouping import search_by_person
from retrieval.gallery.pool_rerank import pool_rerank
from retrieval.gallery.rwlock import ReadWriteLock
from retrieval.gallery.wal import WriteAheadLog, fsync_dir
from retrieval.owner_lock import OwnerLock

log = logging.getLogger(__name__)
HNSW_M = 32
# FAISS GPU indexes return at most this many neighbours per query (GPU_MAX_SELECTION_K: 1024 in
# older builds, 2048 in newer ones; the lower bound holds for both).
GPU_MAX_K = 1024
# An HNSW search restricted to few entries walks a graph whose neighbours are mostly excluded and
# returns too few of them (3 of 5 matching entries missed among 5,000 in a test); up to this many
# allowed entries an exact scan of just those is both right and cheap (40,000 x 512-d is about
# 80 MB). The same cut-off as Weaviate's default flatSearchCutoff.
EXACT_SEARCH_CUTOFF = 40_000
# Entries an add to an HNSW gallery puts into the graph per hold of the write lock: the graph takes
# 0.2-0.5 ms per entry on 2 cores, so one add of 20,000 entries kept every search out for 5.6 s;
# at 1,024 a part, 0.3 s. Smaller parts cost the add more (FAISS inserts a batch in parallel):
# 20,000 entries took 5.7 s whole, 6.5 s in parts of 1,024, 8.2 s in parts of 256.
HNSW_ADD_CHUNK = 1024
# Up to this many queries an exact scan of the allowed rows runs in FAISS, query by query; more
# are faster as BLAS products (measured at 8 queries).
FEW_QUERIES = 4
# Up to this many dead rows (removed since the last snapshot) an unfiltered flat search fetches k
# more and drops the dead ones; past it, it scans the live rows only.
OVERFETCH_DEAD = 1024
# Rows per BLAS product when an exact scan covers most rows: 64 queries x 65,536 rows of scores
# is 16 MB at a time, not 256 MB for a million rows.
EXACT_BLOCK = 65_536
# Query-row products one part of a search computes: the queries of a call go in parts of about
# equal size, and a caller that has gone stops the search between parts (4,096 queries over a
# million rows ran 30 s or more). 2^28 is 512 queries over 500,000 rows, about 0.3 s at 256-d on
# 2 cores. Parts of at least SEARCH_PART_QUERIES queries keep FAISS's products efficient: a flat
# search in parts of 512 queries took 0-5 % longer than in one (at 500,000 and 1,000,000 rows),
# in parts of 256 7-20 % longer.
SEARCH_PART_WORK = 2**28
SEARCH_PART_QUERIES = 512


def _top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims``, the k largest values and their columns, best first; equal values in
    column order (as a stable sort of the whole row gives, up to ties at the k-th place)."""
    take = min(k, sims.shape[1])
    if take < sims.shape[1]:  # the top ``take`` unordered: a full sort of 40,000 took 3 ms a query
        cols = np.sort(np.argpartition(-sims, take - 1, axis=1)[:, :take], axis=1)
    else:
        cols = np.broadcast_to(np.arange(take), (len(sims), take))
    cols = np.take_along_axis(cols, np.argsort(-np.take_along_axis(sims, cols, axis=1), axis=1, kind="stable"), axis=1)
    return np.take_along_axis(sims, cols, axis=1), cols


class _Gallery(Persistence):
    """One gallery: rows of ids and metadata, a FAISS index over every row (node i is row i; it
    holds the vectors), its log. Removed rows stay, marked dead, until a snapshot compacts them."""

    def __init__(self, directory: Path, dim: int, index_type: str, snapshot_every: int, model: str = ""):
        self.dir, self.dim, self.index_type, self.snapshot_every = directory, dim, index_type, snapshot_every
        self.model = model
        self.lock = ReadWriteLock()  # searches read side by side; changes write alone
        # Changes one at a time, in the log's order, from validation to their last applied row; they
        # take the write lock only to apply rows (not to log them), so searches get in between.
        self._changes = threading.Lock()
        self.faiss = import_faiss()
        self._ids = Column(np.int64)
        self._vectors = Column(np.float32, dim)  # a snapshot's vectors, until the index holds them
        self.meta: list[EntryMetadata] = []
        self._alive = Column(bool)
        # columns of the metadata that filters use, row-aligned: camera ids, timestamps, and a coded
        # column per label key, made when a search first filters on that key
        self._cams = Coded()
        self._label_columns: dict[str, Coded] = {}
        self._label_keys: set[str] = set()  # every key an entry has had: others match nothing
        self._label_lock = threading.Lock()  # searches, which share the gallery, make label columns
        self._times = Column(np.float64)
        self.row: dict[int, int] = {}
        self.changes_since_snapshot = 0
        self._gpu = None  # flat galleries: a GPU copy of every row, dead ones included (see _new_index)
        self._gpu_lock = threading.Lock()  # FAISS GPU indexes allow no concurrent searches
        self.dropped = False  # set under the lock by the store's drop
        # Above every id this gallery has held, removed ones included, so an assigned id is never
        # reused: a caller may still hold a removed one. Kept in snapshots (compaction forgets the
        # removed rows); the log's adds raise it on replay.
        self.next_id = 1
        self.wal = WriteAheadLog(directory / "wal.log")
        self._next_segment = 1  # the number of the next sealed log segment, wal-<n>.log
        self._snapshot_lock = threading.RLock()  # one snapshot at a time; a drop or close waits for it
        self._snapshot_thread: threading.Thread | None = None  # the automatic snapshot running, if any
        # People were removed: the next snapshot compacts, so that their vectors leave the disk too
        # (the log that added them, the rows and an HNSW graph saved before), not only the searches.
        self._purge = False
        self._load()

    ids = property(lambda self: self._ids.view)
    alive = property(lambda self: self._alive.view)
    times = property(lambda self: self._times.view)

    @property
    def vectors(self) -> np.ndarray:
        """Row-aligned vectors: the index's own storage (node i is row i), viewed, not copied: a
        second copy cost 2 GB per million 512-d entries. The view is valid until the index next
        grows, so callers use it within one locked operation."""
        if not hasattr(self, "index"):
            return self._vectors.view
        return self._stored(self.index)

    def _stored(self, index) -> np.ndarray:
        """A view of the vectors that ``index`` (this gallery's kind) holds, node by node."""
        return self.faiss.rev_swig_ptr(self._flat(index).get_xb(), index.ntotal * self.dim).reshape(-1, self.dim)

    def _flat(self, index=None):
        """The flat index over every row of ``index`` (default: the live one): the index itself, or
        an HNSW graph's storage."""
        index = self.index if index is None else index
        return index if self.index_type == "flat" else self.faiss.downcast_index(index.storage)

    # ---- persistence -------------------------------------------------------------------------
    def _require_open(self) -> None:
        """A call that got this gallery before a drop and its lock after: it must not touch files,
        since its log would reopen at the same path, in a new gallery of the same name."""
        if self.dropped:
            raise GalleryNotFound(f"gallery {self.dir.name!r} was dropped")

    @staticmethod
    def _add_to(index, gpu, vectors: np.ndarray) -> None:
        if len(vectors):
            index.add(vectors)
            if gpu is not None:
                gpu.add(vectors)

    # ---- in-memory state -----------------------------------------------------------------------
    def _append_rows(self, ids, vectors, meta, alive: np.ndarray | None = None) -> None:
        """Append rows, all live unless ``alive`` says otherwise (a snapshot's removed HNSW rows)."""
        start = len(self.ids)
        alive = np.ones(len(ids), dtype=bool) if alive is None else alive
        self._ids.extend(ids)
        if not hasattr(self, "index"):  # else the index gets them
            self._vectors.extend(vectors)
        self.meta += list(meta)
        self._cams.extend(m.camera_id for m in meta)
        for key, column in self._label_columns.items():
            column.extend(m.labels.get(key) for m in meta)
        self._label_keys.update(key for m in meta for key in m.labels)
        self._times.extend(np.array([m.timestamp for m in meta], dtype=np.float64))
        self._alive.extend(alive)
        for offset in np.flatnonzero(alive).tolist():
            self.row[int(ids[offset])] = start + offset

    def _apply_add(self, ids, vectors, meta) -> None:
        if len(ids):
            self.next_id = max(self.next_id, int(ids.max()) + 1)
        self._apply_remove(ids[[i in self.row for i in ids.tolist()]])
        self._append_rows(ids, vectors, meta)
        if hasattr(self, "index"):  # the new rows' nodes (and GPU rows) follow the others: still row-aligned
            self._add_to(self.index, self._gpu, vectors)

    def _apply_remove(self, ids) -> None:
        present = [i for i in ids.tolist() if i in self.row]
        if not present:
            return
        for i in present:
            self.alive[self.row.pop(i)] = False
        # the indexes keep the row: searches skip dead rows, and the next snapshot drops them

    def _rebuild_index(self) -> None:
        """The index over the rows' own vectors, at a start whose snapshot had no usable graph."""
        self.index, self._gpu = self._new_index(self._vectors.view)
        self._vectors = Column(np.float32, self.dim)

    def _new_index(self, vectors: np.ndarray):
        """A CPU index over ``vectors``, which then holds the only copy of them, and for flat
        galleries on a machine with GPUs a GPU copy (else None).

        Both index types hold every row, dead ones too, and node i is row i, as in the HNSW graphs
        that snapshots save and read back: an HNSW graph cannot remove, and a flat index that
        removed rows would no longer line up with them. Searches skip dead rows with a bitmap over
        rows. (Labelled by entry id, a replaced entry's old vector still answered searches as that
        id, at score 1.0 for its old image.)

        The CPU index answers filtered searches and removals. FAISS GPU indexes can do neither:
        they ignore an IDSelector in the search parameters (faiss issues 3114, 3924) and do not
        implement remove_ids (faiss issue 584). So the GPU copy holds every row in row order and
        answers unfiltered searches only, over-fetching by the dead rows it still holds and
        dropping them; it is rebuilt without them at the next snapshot.
        """
        f = self.faiss
        if self.index_type == "hnsw":
            index = f.IndexHNSWFlat(self.dim, HNSW_M, f.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        else:
            index = f.IndexFlatIP(self.dim)
        gpu = None
        if self.index_type == "flat" and f.get_num_gpus() > 0:  # without GPUs the copy would be an empty replica set
            gpu = f.index_cpu_to_all_gpus(f.IndexFlatIP(self.dim))
        self._add_to(index, gpu, vectors)
        return index, gpu

    @property
    def device(self) -> str:
        return "cpu" if self._gpu is None else "cuda"

    def _search_live(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Unfiltered top-k from a plain search of a flat index over every row (the GPU copy, else
        the CPU index) that fetches k + the dead rows and drops those: as fast as a search with no
        dead row (a bitmap of the live rows made FAISS scan row by row: 64 queries took 3x as long).
        None when too many rows are dead for that."""
        dead = len(self.ids) - int(self.alive.sum())
        fetch = min(k + dead, len(self.ids))
        if self._gpu is not None and fetch <= GPU_MAX_K:
            index, lock = self._gpu, self._gpu_lock
        elif self.index_type == "flat" and dead <= OVERFETCH_DEAD:
            index, lock = self.index, contextlib.nullcontext()
        else:
            return None
        with lock:
            scores, rows = index.search(queries, fetch)
        keep = rows >= 0
        keep[keep] = self.alive[rows[keep]]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # the live ones first, in score order
        scores, rows, keep = (np.take_along_axis(a, order, axis=1) for a in (scores, rows, keep))
        return np.where(keep, scores, -np.inf).astype(np.float32), np.where(keep, self.ids[np.where(keep, rows, 0)], -1)

    # ---- operations ----------------------------------------------------------------------------
    def add(self, ids: np.ndarray, vectors: np.ndarray, meta: list[EntryMetadata], replace: bool) -> np.ndarray:
        """Logged whole (fsync'ed) beside searches, then applied under the write lock, an HNSW
        gallery's entries HNSW_ADD_CHUNK at a time: a search meanwhile may see the first part of
        the add, as one that came a little later would. A crash replays the whole add."""
        with self._changes:
            with self.lock.read():  # a compaction may swap the rows in meanwhile
                self._require_open()
                ids = check_entries(self.dir.name, self.dim, ids, vectors, meta)
                given = ids[ids > 0]
                if not replace:
                    clash = [i for i in given.tolist() if i in self.row]
                    if clash:
                        raise GalleryExists(f"ids already in gallery {self.dir.name}: {clash[:10]}; set replace to overwrite")
                free = ids == 0
                if free.any():
                    start = max(self.next_id, int(given.max()) + 1 if len(given) else 1)
                    ids[free] = np.arange(start, start + int(free.sum()))
            vectors = l2_normalize(vectors)
            self._log(self._encode({"op": "add", "ids": ids.tolist(), "meta": [m.to_dict() for m in meta]}, vectors))
            step = HNSW_ADD_CHUNK if self.index_type == "hnsw" else max(len(ids), 1)
            for start in range(0, len(ids), step):
                with self.lock.write():  # each hold waits for the searches in progress: no extra one for the count
                    self._apply_add(ids[start : start + step], vectors[start : start + step], meta[start : start + step])
                    if start + step >= len(ids):
                        self._after_change(len(ids))
            return ids

    def remove(self, ids: np.ndarray) -> tuple[int, list[int]]:
        with self._changes:
            with self.lock.read():
                self._require_open()
                ids = np.asarray(ids, dtype=np.int64)
                missing = [i for i in ids.tolist() if i not in self.row]
                present = np.asarray([i for i in ids.tolist() if i in self.row], dtype=np.int64)
            self._remove_present(present)
            return len(present), missing

    def remove_people(self, person_ids: list[str]) -> tuple[int, list[str]]:
        people = check_people(person_ids)
        wanted = set(people)
        with self._changes:  # no add can slip a new entry of theirs in between the scan and the removal
            with self.lock.read():
                self._require_open()
                rows = self._of_people(np.flatnonzero(self.alive), wanted)
                present = self.ids[rows]
                found = {self.meta[r].person_id for r in rows.tolist()}
            self._remove_present(present, purge=True)
            return len(present), [p for p in people if p not in found]

    def remove_before(self, timestamp: float) -> int:
        cutoff = check_cutoff(timestamp)
        with self._changes:
            with self.lock.read():
                self._require_open()
                present = self.ids[self.alive & (self.times > 0) & (self.times < cutoff)]
            self._remove_present(present, purge=True)
            return len(present)

    def _remove_present(self, present: np.ndarray, purge: bool = False) -> None:
        """Under ``_changes``: log the removal of entries that are present, then apply it; with
        ``purge``, a snapshot that compacts them off the disk starts at once."""
        if len(present):
            self._log(self._encode({"op": "remove", "ids": present.tolist()}))
            with self.lock.write():
                self._apply_remove(present)
                self._after_change(len(present), purge)

    def entries(self, after_id: int, limit: int, person_ids: list[str], with_vectors: bool,
                flt: SearchFilter | None) -> EntryPage:
        people = set(check_page(after_id, limit, person_ids, flt))
        with self.lock.read():
            self._require_open()
            rows = np.flatnonzero((self.alive if flt is None else self._allowed(flt)) & (self.ids > after_id))
            if people:
                rows = self._of_people(rows, people)
            more = len(rows) > limit
            if more:  # rows follow the order of adds, not of ids
                rows = rows[np.argpartition(self.ids[rows], limit)[:limit]]
            rows = rows[np.argsort(self.ids[rows])]
            # copies: the vectors' view lasts only as long as the lock
            return EntryPage(self.ids[rows], [self.meta[r] for r in rows.tolist()],
                             self.vectors[rows] if with_vectors else None, more)

    def get(self, ids: np.ndarray) -> EntryPage:
        ids = np.asarray(ids, dtype=np.int64)
        with self.lock.read():
            self._require_open()
            present, vectors, meta = self._fetch(ids[np.fromiter((i in self.row for i in ids.tolist()), bool, len(ids))])
            return EntryPage(present, meta, vectors, False)

    def _of_people(self, rows: np.ndarray, people: set[str]) -> np.ndarray:
        """Those of ``rows`` whose entries carry one of ``people``: a scan of their metadata (there
        is no person index: it would keep every person id ever enrolled in memory, forgotten ones too)."""
        return rows[np.fromiter((self.meta[r].person_id in people for r in rows.tolist()), bool, len(rows))]

    def _allowed(self, flt: SearchFilter) -> np.ndarray:
        mask = self.alive.copy()
        if flt.exclude_camera_id:
            mask &= ~self._cams.equal(flt.exclude_camera_id)
        if flt.time_from:
            mask &= self.times >= flt.time_from
        if flt.time_to:
            mask &= self.times <= flt.time_to
        for key, value in flt.labels.items():
            mask &= self._label_column(key).equal(value) if key in self._label_keys else False
        return mask

    def _label_column(self, key: str) -> Coded:
        """The coded column of label ``key``, made on first use and kept up to date after."""
        with self._label_lock:
            if key not in self._label_columns:
                self._label_columns[key] = Coded(m.labels.get(key) for m in self.meta)
            return self._label_columns[key]

    def _search(self, queries: np.ndarray, k: int, filters: list[SearchFilter]) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        groups: dict[tuple, list[int]] = {}
        for i, flt in enumerate(filters):
            groups.setdefault(flt.key(), []).append(i)
        most = max(SEARCH_PART_QUERIES, SEARCH_PART_WORK // max(len(self.ids), 1))
        for rows in groups.values():
            parts = -(-len(rows) // most)
            size = -(-len(rows) // parts)  # equal parts: no small remainder that would take another path
            for start in range(0, len(rows), size):
                check_cancelled()
                part = rows[start:start + size]
                scores[part], ids[part] = self._search_part(queries[part], k, filters[part[0]])
        return scores, ids

    def _search_part(self, queries: np.ndarray, k: int, flt: SearchFilter) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, entry ids) of queries that share the filter ``flt``."""
        f = self.faiss
        found = self._search_live(queries, k) if flt.is_empty() else None
        if found is not None:
            return found
        params = None
        if not flt.is_empty() or not self.alive.all():
            mask = self._allowed(flt)
            if self.index_type == "flat" or mask.sum() <= EXACT_SEARCH_CUTOFF:
                return self._exact(queries, mask, k)
            params = f.SearchParametersHNSW(sel=self._selector(mask), efSearch=max(64, k))
        elif self.index_type == "hnsw":
            params = f.SearchParametersHNSW(efSearch=max(64, k))
        d, i = self.index.search(queries, k, params=params)
        return d, np.where(i >= 0, self.ids[np.maximum(i, 0)], -1)  # rows -> entry ids

    def _selector(self, mask: np.ndarray):
        """A FAISS selector of the rows in ``mask``: a bitmap over the index's nodes (the rows). A
        set of the allowed ids took 2 ms to build per search at 50,000 entries, where an HNSW
        graph walk itself takes 0.1 ms."""
        bits = np.packbits(mask, bitorder="little")
        selector = self.faiss.IDSelectorBitmap(len(mask), self.faiss.swig_ptr(bits))
        selector.bits = bits  # FAISS keeps only a pointer to them
        return selector

    def _exact(self, queries: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product among the rows in ``mask``, padded like FAISS (-inf, id -1).

        A few queries go to FAISS's flat scan with a bitmap of ``mask``: it computes the allowed
        rows' products in place (11 ms for 39,000 of 100,000 512-d rows, where copying them took
        35-60 ms). More queries use BLAS: over a copy of the allowed rows when they are few, else
        over every row, block by block, with the others scored -inf.
        """
        if len(queries) <= FEW_QUERIES:
            scores, found = self._flat().search(queries, k, params=self.faiss.SearchParameters(sel=self._selector(mask)))
            return scores, np.where(found >= 0, self.ids[np.maximum(found, 0)], -1)
        allowed = np.flatnonzero(mask)
        if 2 * len(allowed) < len(mask):
            scores, cols = _top_k(queries @ self.vectors[allowed].T, k)
            found = allowed[cols]
        else:
            scores, found = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
            vectors = self.vectors
            for start in range(0, len(mask), EXACT_BLOCK):
                sims = queries @ vectors[start:start + EXACT_BLOCK].T
                sims[:, ~mask[start:start + EXACT_BLOCK]] = -np.inf
                best, cols = _top_k(sims, k)
                # the best so far first: they are earlier rows, so equal scores stay in row order
                scores, pick = _top_k(np.concatenate([scores, best], axis=1), k)
                found = np.take_along_axis(np.concatenate([found, cols + start], axis=1), pick, axis=1)
        out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        hit = np.isfinite(scores)
        out_scores[:, : scores.shape[1]] = np.where(hit, scores, -np.inf)
        out_ids[:, : scores.shape[1]] = np.where(hit, self.ids[found], -1)
        return out_scores, out_ids

    def search(self, queries: np.ndarray, top_k: int, filters: list[SearchFilter], rerank: RerankOptions | None,
               group_by_person: bool = False) -> list[list[Hit]]:
        with self.lock.read():
            self._require_open()
            filters = check_queries(self.dir.name, self.dim, queries, filters, top_k)
            live = int(self.alive.sum())
            queries = l2_normalize(queries)
            k = min(top_k, live)
            if k <= 0:
                return [[] for _ in queries]
            if rerank is not None:
                return pool_rerank(queries, top_k, filters, rerank, live, self._search, self._fetch, group_by_person)
            if group_by_person:
                def hits_of(rows: list[int], kk: int) -> list[list[Hit]]:
                    return self._hits(*self._search(queries[rows], kk, [filters[r] for r in rows]))

                return search_by_person(hits_of, len(queries), top_k, live)
            return self._hits(*self._search(queries, k, filters))

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        """``_search``'s arrays as hits, under the read lock that search held."""
        return [[Hit(int(i), float(s), 1.0 - float(s), self.meta[self.row[int(i)]]) for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def _fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[EntryMetadata]]:
        """Under the gallery's lock, as the search that found ``ids``: all of them are present."""
        rows = [self.row[i] for i in ids.tolist()]
        return ids, self.vectors[rows], [self.meta[r] for r in rows]

    def info(self, name: str) -> GalleryInfo:
        return GalleryInfo(name, self.dim, int(self.alive.sum()), self.index_type, "faiss", self.device, self.model)

    def close(self) -> None:
        self.settle()
        with self._snapshot_lock:
            if self.changes_since_snapshot and not self.dropped:
                try:
                    self.snapshot()
                except StorageError as exc:
                    log.warning("%s (the log still holds every change)", exc)


class GalleryDirInUse(GalleryError):
    """Another process owns the gallery directory."""


class FaissGalleryStore(GalleryBackend):
    """Named FAISS galleries under one directory."""

    def __init__(self, root: str | Path, snapshot_every: int = 50_000):
        self.root = Path(root)
        self.location = f"FAISS in {self.root.absolute()}"
        self.snapshot_every = snapshot_every
        self.lock = threading.Lock()
        self.galleries: dict[str, _Gallery] = {}
        if self.root.exists() and not self.root.is_dir():  # mkdir said only "File exists"
            raise GalleryError(f"gallery directory {self.root} is a file; give a folder (made if missing)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.owner = self._own(self.root)  # before anything is read: another server may be writing it
        except OSError as exc:
            raise storage_error(exc, f"cannot open gallery directory {self.root}") from None
        start = time.monotonic()
        try:
            self._open_galleries()
        except BaseException:
            self.owner.release()
            raise
        self.load_seconds = time.monotonic() - start

    @staticmethod
    def _own(root: Path) -> OwnerLock:
        """One server owns a gallery directory (see ``retrieval.owner_lock``)."""
        def in_use(holder: str) -> GalleryDirInUse:
            return GalleryDirInUse(
                f"gallery directory {root} is in use by another process ({holder}); one server owns a FAISS gallery "
                "directory: stop that one first, give this one its own --gallery-dir, or share galleries between "
                "servers through Milvus (--gallery-backend milvus)")

        return OwnerLock(root, "other servers off this gallery directory", in_use, GalleryError)

    def _open_galleries(self) -> None:
        for cfg in sorted(self.root.glob("*/gallery.json")):
            try:
                meta = json.loads(cfg.read_text())
                dim, index_type, model = int(meta["dim"]), str(meta["index_type"]), str(meta.get("model", ""))
                if index_type not in INDEX_TYPES or dim < 1:  # else it would load as some other index
                    raise ValueError(f"dim {dim} and index_type {index_type!r}")
                written = int(meta.get("format", 1))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise GalleryError(f"{cfg} is unreadable ({exc}); refusing to start: restore it (it holds "
                                   '{"dim": D, "index_type": "flat" or "hnsw"}) or move the gallery directory aside') from None
            if written > FORMAT:
                raise GalleryError(f"gallery {cfg.parent.name} is in format {written}, written by a newer version of "
                                   f"reid; this one reads format {FORMAT} and older: run a reid-serve as new as the one "
                                   "that wrote it")
            self.galleries[cfg.parent.name] = _Gallery(cfg.parent, dim, index_type, self.snapshot_every, model)

    def _get(self, name: str) -> _Gallery:
        try:
            return self.galleries[name]
        except KeyError:
            raise GalleryNotFound(f"no gallery named {name!r}") from None

    def create(self, name: str, dim: int, index_type: str = "flat", model: str = "") -> GalleryInfo:
        check_new_gallery(name, dim, index_type, max_dim=65536)
        with self.lock:
            if name in self.galleries:
                raise GalleryExists(f"gallery {name!r} already exists")
            directory = self.root / name
            if directory.exists():
                leftover = {p.name for p in directory.iterdir()} if directory.is_dir() else None
                if leftover is None or leftover - {"gallery.json.tmp"}:
                    # never delete what this store did not write: it may be anything a user put there
                    twins = [n for n in self.galleries if n.casefold() == name.casefold()]
                    if twins and leftover and "gallery.json" in leftover:  # macOS and Windows file systems ignore case
                        raise GalleryExists(f"gallery {name!r} would share its folder with gallery {twins[0]!r}: "
                                            f"the file system under {self.root} does not tell names apart by case; "
                                            "choose another name")
                    raise GalleryExists(f"{directory} exists but is not a gallery (no gallery.json); "
                                        "move it aside or choose another name")
                shutil.rmtree(directory)  # the remains of a create that crashed before it finished
            try:
                directory.mkdir()
                tmp = directory / "gallery.json.tmp"
                tmp.write_text(json.dumps({"format": FORMAT, "dim": dim, "index_type": index_type,
                                           **({"model": model} if model else {})}))
                os.replace(tmp, directory / "gallery.json")
                fsync_dir(directory)
            except OSError as exc:
                shutil.rmtree(directory, ignore_errors=True)
                raise storage_error(exc, f"cannot create gallery {name!r}") from None
            self.galleries[name] = _Gallery(directory, dim, index_type, self.snapshot_every, model)
            return self.galleries[name].info(name)

    def drop(self, name: str) -> None:
        """Waits for the gallery's calls and snapshot in progress; calls that reach it later find
        it dropped."""
        with self.lock:
            gallery = self._get(name)
        # a snapshot or an add in progress must not write into the removed directory
        with gallery._snapshot_lock, gallery._changes, gallery.lock.write():
            gallery._require_open()  # another drop got there first
            try:
                shutil.rmtree(gallery.dir)
            except OSError as exc:
                raise storage_error(exc, f"cannot drop gallery {name!r}") from None
            gallery.dropped = True
        with self.lock:
            if self.galleries.get(name) is gallery:
                del self.galleries[name]

    def list(self) -> list[GalleryInfo]:
        with self.lock:
            return [g.info(n) for n, g in sorted(self.galleries.items())]

    def info(self, name: str) -> GalleryInfo:
        return self._get(name).info(name)

    def add(self, name, ids, vectors, metadata, replace=False):
        return self._get(name).add(ids, np.asarray(vectors, dtype=np.float32), metadata, replace)

    def remove(self, name, ids):
        return self._get(name).remove(ids)

    def remove_people(self, name, person_ids):
        return self._get(name).remove_people(person_ids)

    def remove_before(self, name, timestamp):
        return self._get(name).remove_before(timestamp)

    def model(self, name: str) -> str:
        return self._get(name).model

    def entries(self, name, after_id=0, limit=1000, person_ids=(), with_vectors=False, flt=None):
        return self._get(name).entries(after_id, limit, list(person_ids), with_vectors, flt)

    def get(self, name, ids):
        return self._get(name).get(ids)

    def search(self, name, queries, top_k, filters, rerank=None, group_by_person=False):
        return self._get(name).search(np.asarray(queries, dtype=np.float32), top_k, filters, rerank, group_by_person)

    def snapshot(self, name: str) -> None:
        self._get(name).snapshot()

    def settle(self) -> None:
        """Wait for the automatic snapshots in progress (tests and benchmarks that restart a store
        in the same process, as a crash would, must not leave one writing)."""
        with self.lock:
            galleries = list(self.galleries.values())
        for gallery in galleries:
            gallery.settle()

    def close(self) -> None:
        for gallery in self.galleries.values():
            gallery.close()
        self.owner.release()
