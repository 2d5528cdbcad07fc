"""FAISS galleries on local disk that survive crashes: snapshot + write-ahead log per gallery.

Layout: ``ROOT/<gallery>/gallery.json`` (dimension, index type), ``snapshot.npz`` (ids, vectors,
metadata; written to a temporary file, fsync'ed and renamed), ``wal.log`` (every add/remove since
the snapshot). An add or remove is in the log, fsync'ed, before it is applied and acknowledged. On
start a gallery is its snapshot plus the log replayed. A corrupt snapshot stops the start with a
message naming the file (the log alone cannot rebuild what the snapshot held).

In memory a gallery's FAISS index holds every row (node i is row i) and the only copy of its
vectors; removed rows stay in it, marked dead and skipped by searches, until a snapshot compacts
them. Searches of a gallery run side by side; changes run alone.

HNSW galleries also save their graph, ``hnsw-<token>.faiss``, written before the snapshot that
names it: building the graph anew took about 0.45 ms per entry on 2 cores (7 minutes at a million),
reading it back a few milliseconds per 10,000. Their snapshots keep removed rows (marked dead, as
in memory) until a compaction, so the graph's nodes stay the snapshot's rows. A missing or
unusable graph is rebuilt from the rows, with a warning: it holds nothing the snapshot does not.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from retrieval.distance import l2_normalize
from retrieval.faiss_setup import import_faiss
from retrieval.gallery.base import (
    INDEX_TYPES, EntryMetadata, GalleryBackend, GalleryError, GalleryExists, GalleryInfo, GalleryNotFound, Hit,
    RerankOptions, SearchFilter, StorageError, check_entries, check_new_gallery, check_queries,
)
from retrieval.gallery.wal import WriteAheadLog, fsync_dir
from retrieval.gallery.pool_rerank import pool_rerank
from retrieval.gallery.rwlock import ReadWriteLock

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
# A snapshot compacts an HNSW gallery (drops its removed rows, rebuilds the graph) only when more
# than this share of its rows is dead: the rebuild takes about 0.45 ms per entry on 2 cores (13.5 s
# for 30,000 512-d entries) under the gallery's lock, which stopped every search meanwhile, while
# dead rows cost only their filtering at search time.
HNSW_COMPACT_DEAD_SHARE = 0.2
# Up to this many queries an exact scan of the allowed rows runs in FAISS, query by query; more
# are faster as BLAS products (measured at 8 queries).
FEW_QUERIES = 4
# Up to this many dead rows (removed since the last snapshot) an unfiltered flat search fetches k
# more and drops the dead ones; past it, it scans the live rows only.
OVERFETCH_DEAD = 1024
# Rows per BLAS product when an exact scan covers most rows: 64 queries x 65,536 rows of scores
# is 16 MB at a time, not 256 MB for a million rows.
EXACT_BLOCK = 65_536


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


def _storage(exc: OSError, what: str) -> StorageError:
    return StorageError(f"{what}: {exc.strerror or exc}")


class _Column:
    """A row-aligned array that grows by doubling, so adding n entries copies O(n), not O(n * size)."""

    def __init__(self, dtype, width: int | None = None):
        self._buf = np.empty((16,) if width is None else (16, width), dtype=dtype)
        self.n = 0

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self.n]

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self._buf):
            grown = np.empty((max(need, 2 * len(self._buf)),) + self._buf.shape[1:], dtype=self._buf.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = values
        self.n = need

    def keep(self, mask: np.ndarray) -> None:
        kept = self.view[mask]
        self._buf, self.n = kept.copy(), len(kept)


class _Coded:
    """A row-aligned column of strings kept as int32 codes (-1: no value), so that a filter
    compares integers: comparing 100,000 camera ids as strings took about 2 ms of a 0.5 ms HNSW
    search, and matching a label entry by entry 60 ms."""

    def __init__(self, values=()):
        self.codes: dict[str, int] = {}
        self.column = _Column(np.int32)
        self.extend(values)

    def extend(self, values) -> None:
        codes = self.codes
        self.column.extend(np.array([-1 if v is None else codes.setdefault(v, len(codes)) for v in values], dtype=np.int32))

    def equal(self, value: str) -> np.ndarray:
        """Which rows hold ``value``."""
        code = self.codes.get(value)
        return np.zeros(self.column.n, dtype=bool) if code is None else self.column.view == code


class _Gallery:
    """One gallery: rows of ids and metadata, a FAISS index over every row (node i is row i; it
    holds the vectors), its log. Removed rows stay, marked dead, until a snapshot compacts them."""

    def __init__(self, directory: Path, dim: int, index_type: str, snapshot_every: int):
        self.dir, self.dim, self.index_type, self.snapshot_every = directory, dim, index_type, snapshot_every
        self.lock = ReadWriteLock()  # searches read side by side; changes write alone
        self.faiss = import_faiss()
        self._ids = _Column(np.int64)
        self._vectors = _Column(np.float32, dim)  # a snapshot's vectors, until the index holds them
        self.meta: list[EntryMetadata] = []
        self._alive = _Column(bool)
        # columns of the metadata that filters use, row-aligned: camera ids, timestamps, and a coded
        # column per label key, made when a search first filters on that key
        self._cams = _Coded()
        self._label_columns: dict[str, _Coded] = {}
        self._label_keys: set[str] = set()  # every key an entry has had: others match nothing
        self._label_lock = threading.Lock()  # searches, which share the gallery, make label columns
        self._times = _Column(np.float64)
        self.row: dict[int, int] = {}
        self.changes_since_snapshot = 0
        self._gpu = None  # flat galleries: a GPU copy of every row, dead ones included (see _rebuild_index)
        self._gpu_lock = threading.Lock()  # FAISS GPU indexes allow no concurrent searches
        self.dropped = False  # set under the lock by the store's drop
        # Above every id this gallery has held, removed ones included, so an assigned id is never
        # reused: a caller may still hold a removed one. Kept in snapshots (compaction forgets the
        # removed rows); the log's adds raise it on replay.
        self.next_id = 1
        self.wal = WriteAheadLog(directory / "wal.log")
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
        return self.faiss.rev_swig_ptr(self._flat().get_xb(), self.index.ntotal * self.dim).reshape(-1, self.dim)

    def _flat(self):
        """The flat index over every row: the index itself, or an HNSW graph's storage."""
        return self.index if self.index_type == "flat" else self.faiss.downcast_index(self.index.storage)

    # ---- persistence -------------------------------------------------------------------------
    def _load(self) -> None:
        snap = self.dir / "snapshot.npz"
        graph = ""
        if snap.exists():
            try:
                with np.load(snap, allow_pickle=False) as data:
                    ids, vectors, meta = data["ids"], data["vectors"], json.loads(str(data["meta"]))
                    next_id = int(data["next_id"]) if "next_id" in data.files else 1  # absent before it was kept
                    alive = data["alive"].astype(bool) if "alive" in data.files else None  # all live when absent
                    graph = str(data["graph"]) if "graph" in data.files else ""
                    if alive is not None and len(alive) != len(ids):
                        raise ValueError(f"{len(alive)} row flags for {len(ids)} rows")
            except Exception as exc:  # noqa: BLE001 - any unreadable snapshot
                raise GalleryError(f"snapshot {snap} is corrupt ({exc}); refusing to start: restore it from a backup "
                                   "or move the gallery directory aside") from None
            self._append_rows(ids.astype(np.int64), vectors.astype(np.float32), [EntryMetadata(**m) for m in meta], alive)
            self.next_id = max(next_id, int(ids.max()) + 1 if len(ids) else 1)
        if graph:
            self._read_graph(graph)  # before the log's replay, which then adds to it
        replayed = 0
        for payload in self.wal.replay():
            self._apply(payload)
            replayed += 1
        if replayed:
            log.info("gallery %s: replayed %d log records", self.dir.name, replayed)
        if hasattr(self, "index"):
            return
        start = time.perf_counter()
        self._rebuild_index()
        if self.index_type == "hnsw" and len(self.ids):  # minutes at a million entries: say where startup went
            log.info("gallery %s: built its HNSW index over %d entries in %.1f s", self.dir.name, len(self.ids),
                     time.perf_counter() - start)

    def _read_graph(self, name: str) -> None:
        """Set ``self.index`` to the saved HNSW graph, if it is the one for the rows just loaded."""
        start = time.perf_counter()
        try:
            index = self.faiss.read_index(str(self.dir / name))
            if not isinstance(index, self.faiss.IndexHNSWFlat) or index.d != self.dim:
                raise ValueError(f"a {type(index).__name__} of dimension {index.d}")
            if index.ntotal != len(self.ids):  # node i is row i
                raise ValueError(f"{index.ntotal} nodes for {len(self.ids)} rows")
        except (RuntimeError, ValueError) as exc:  # faiss raises RuntimeError for missing or corrupt files
            log.warning("gallery %s: its saved HNSW graph %s is unusable (%s); rebuilding it", self.dir.name, name, exc)
            return
        self.index, self._vectors = index, _Column(np.float32, self.dim)  # the graph holds them now
        log.info("gallery %s: read its HNSW graph over %d rows in %.2f s", self.dir.name, len(self.ids),
                 time.perf_counter() - start)

    def _write_graph(self) -> str:
        """Save the HNSW graph (fsync'ed) under a new name and return it; "" when it cannot be
        written: the snapshot then goes without it, and the next start rebuilds the graph."""
        name = f"hnsw-{secrets.token_hex(8)}.faiss"
        tmp = self.dir / (name + ".tmp")
        try:
            self.faiss.write_index(self.index, str(tmp))
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.dir / name)
        except (OSError, RuntimeError) as exc:  # faiss reports a failed write as RuntimeError
            tmp.unlink(missing_ok=True)
            log.warning("gallery %s: cannot save its HNSW graph (%s); the next start rebuilds it", self.dir.name, exc)
            return ""
        return name

    @staticmethod
    def _encode(op: dict, vectors: np.ndarray | None = None) -> bytes:
        header = json.dumps(op).encode()
        body = vectors.astype(np.float32).tobytes() if vectors is not None else b""
        return len(header).to_bytes(4, "little") + header + body

    def _apply(self, payload: bytes) -> None:
        n = int.from_bytes(payload[:4], "little")
        op = json.loads(payload[4 : 4 + n])
        ids = np.asarray(op["ids"], dtype=np.int64)
        if op["op"] == "add":
            vectors = np.frombuffer(payload[4 + n :], dtype=np.float32).reshape(len(ids), self.dim)
            self._apply_add(ids, vectors, [EntryMetadata(**m) for m in op["meta"]])
        else:
            self._apply_remove(ids)

    def _log(self, payload: bytes) -> None:
        try:
            self.wal.append(payload)
        except OSError as exc:
            raise _storage(exc, f"cannot write the log of gallery {self.dir.name}") from None

    def _require_open(self) -> None:
        """A call that got this gallery before a drop and its lock after: it must not touch files,
        since its log would reopen at the same path, in a new gallery of the same name."""
        if self.dropped:
            raise GalleryNotFound(f"gallery {self.dir.name!r} was dropped")

    def snapshot(self) -> None:
        """Write the rows (and an HNSW gallery's graph) atomically, then empty the log.

        Removed rows are dropped first, except in an HNSW gallery with at most
        HNSW_COMPACT_DEAD_SHARE of them: there they are saved marked dead, beside the graph that
        still holds them.
        """
        with self.lock.write():
            self._require_open()
            dead = len(self.ids) - int(self.alive.sum())
            if dead and (self.index_type != "hnsw" or dead > HNSW_COMPACT_DEAD_SHARE * len(self.ids)):
                self._compact()
            graph = self._write_graph() if self.index_type == "hnsw" else ""
            arrays = {"ids": self.ids, "vectors": self.vectors, "next_id": np.int64(self.next_id),
                      "meta": np.array(json.dumps([m.to_dict() for m in self.meta])), "graph": np.array(graph)}
            if not self.alive.all():
                arrays["alive"] = self.alive
            tmp = self.dir / "snapshot.npz.tmp"
            try:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.dir / "snapshot.npz")
                fsync_dir(self.dir)
                self.wal.truncate()
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                if graph:  # the snapshot on disk still names the graph before this one
                    (self.dir / graph).unlink(missing_ok=True)
                raise _storage(exc, f"cannot write the snapshot of gallery {self.dir.name}") from None
            for old in self.dir.glob("hnsw-*.faiss*"):  # older graphs, and a crashed write's leftovers
                if old.name != graph:
                    old.unlink(missing_ok=True)
            self.changes_since_snapshot = 0

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
        start = len(self.ids)
        self._append_rows(ids, vectors, meta)
        if hasattr(self, "index"):
            self.index.add(vectors)  # nodes start..start+n-1: the new rows
        if self._gpu is not None:
            self._gpu.add(vectors)  # rows keep their positions: the copy stays aligned with self.ids

    def _apply_remove(self, ids) -> None:
        present = [i for i in ids.tolist() if i in self.row]
        if not present:
            return
        for i in present:
            self.alive[self.row.pop(i)] = False
        # the indexes keep the row: searches skip dead rows, and the next snapshot drops them

    def _compact(self) -> None:
        keep = self.alive.copy()
        vectors = self.vectors[keep]
        self.meta = [m for m, a in zip(self.meta, keep) if a]
        for column in (self._ids, self._cams.column, self._times, self._alive, *(c.column for c in self._label_columns.values())):
            column.keep(keep)
        self.row = {i: r for r, i in enumerate(self.ids.tolist())}
        self._rebuild_index(vectors)

    def _rebuild_index(self, vectors: np.ndarray | None = None) -> None:
        """The CPU index over ``vectors`` (default: the rows' own), which then holds the only copy
        of them, and for flat galleries on a machine with GPUs a GPU copy.

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
        vectors = self.vectors if vectors is None else vectors  # may view the old graph: keep it until done
        if self.index_type == "hnsw":
            index = f.IndexHNSWFlat(self.dim, HNSW_M, f.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        else:
            index = f.IndexFlatIP(self.dim)
        if len(vectors):
            index.add(vectors)
        self.index, self._vectors = index, _Column(np.float32, self.dim)
        self._gpu = None
        if self.index_type == "flat" and f.get_num_gpus() > 0:  # without GPUs the copy would be an empty replica set
            self._gpu = f.index_cpu_to_all_gpus(f.IndexFlatIP(self.dim))
            if len(vectors):
                self._gpu.add(vectors)

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
        with self.lock.write():
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
            self._apply_add(ids, vectors, meta)
            self._after_change(len(ids))
            return ids

    def remove(self, ids: np.ndarray) -> tuple[int, list[int]]:
        with self.lock.write():
            self._require_open()
            ids = np.asarray(ids, dtype=np.int64)
            missing = [i for i in ids.tolist() if i not in self.row]
            present = np.asarray([i for i in ids.tolist() if i in self.row], dtype=np.int64)
            if len(present):
                self._log(self._encode({"op": "remove", "ids": present.tolist()}))
                self._apply_remove(present)
                self._after_change(len(present))
            return len(present), missing

    def _after_change(self, n: int) -> None:
        self.changes_since_snapshot += n
        if self.changes_since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except StorageError as exc:  # the change itself is durable in the log
                log.warning("%s", exc)

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

    def _label_column(self, key: str) -> _Coded:
        """The coded column of label ``key``, made on first use and kept up to date after."""
        with self._label_lock:
            if key not in self._label_columns:
                self._label_columns[key] = _Coded(m.labels.get(key) for m in self.meta)
            return self._label_columns[key]

    def _search(self, queries: np.ndarray, k: int, filters: list[SearchFilter]) -> tuple[np.ndarray, np.ndarray]:
        f = self.faiss
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        groups: dict[tuple, list[int]] = {}
        for i, flt in enumerate(filters):
            groups.setdefault(flt.key(), []).append(i)
        for rows in groups.values():
            flt = filters[rows[0]]
            found = self._search_live(queries[rows], k) if flt.is_empty() else None
            if found is not None:
                scores[rows], ids[rows] = found
                continue
            params = None
            if not flt.is_empty() or not self.alive.all():
                mask = self._allowed(flt)
                if self.index_type == "flat" or mask.sum() <= EXACT_SEARCH_CUTOFF:
                    scores[rows], ids[rows] = self._exact(queries[rows], mask, k)
                    continue
                params = f.SearchParametersHNSW(sel=self._selector(mask), efSearch=max(64, k))
            elif self.index_type == "hnsw":
                params = f.SearchParametersHNSW(efSearch=max(64, k))
            d, i = self.index.search(queries[rows], k, params=params)
            scores[rows], ids[rows] = d, np.where(i >= 0, self.ids[np.maximum(i, 0)], -1)  # rows -> entry ids
        return scores, ids

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

    def search(self, queries: np.ndarray, top_k: int, filters: list[SearchFilter], rerank: RerankOptions | None) -> list[list[Hit]]:
        with self.lock.read():
            self._require_open()
            filters = check_queries(self.dir.name, self.dim, queries, filters, top_k)
            live = int(self.alive.sum())
            queries = l2_normalize(queries)
            k = min(top_k, live)
            if k <= 0:
                return [[] for _ in queries]
            if rerank is None:
                scores, ids = self._search(queries, k, filters)
                return [[Hit(int(i), float(s), 1.0 - float(s), self.meta[self.row[int(i)]])
                         for s, i in zip(srow, irow) if i >= 0] for srow, irow in zip(scores, ids)]
            return pool_rerank(queries, top_k, filters, rerank, live, self._search, self._fetch)

    def _fetch(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[EntryMetadata]]:
        """Under the gallery's lock, as the search that found ``ids``: all of them are present."""
        rows = [self.row[i] for i in ids.tolist()]
        return ids, self.vectors[rows], [self.meta[r] for r in rows]

    def info(self, name: str) -> GalleryInfo:
        return GalleryInfo(name, self.dim, int(self.alive.sum()), self.index_type, "faiss", self.device)

    def close(self) -> None:
        with self.lock.write():
            if self.changes_since_snapshot:
                try:
                    self.snapshot()
                except StorageError as exc:
                    log.warning("%s (the log still holds every change)", exc)
            self.wal.close()


class FaissGalleryStore(GalleryBackend):
    """Named FAISS galleries under one directory."""

    def __init__(self, root: str | Path, snapshot_every: int = 50_000):
        self.root = Path(root)
        self.snapshot_every = snapshot_every
        self.lock = threading.Lock()
        self.galleries: dict[str, _Gallery] = {}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage(exc, f"cannot create gallery directory {self.root}") from None
        for cfg in sorted(self.root.glob("*/gallery.json")):
            try:
                meta = json.loads(cfg.read_text())
                dim, index_type = int(meta["dim"]), str(meta["index_type"])
                if index_type not in INDEX_TYPES or dim < 1:  # else it would load as some other index
                    raise ValueError(f"dim {dim} and index_type {index_type!r}")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise GalleryError(f"{cfg} is unreadable ({exc}); refusing to start: restore it (it holds "
                                   '{"dim": D, "index_type": "flat" or "hnsw"}) or move the gallery directory aside') from None
            self.galleries[cfg.parent.name] = _Gallery(cfg.parent, dim, index_type, snapshot_every)

    def _get(self, name: str) -> _Gallery:
        try:
            return self.galleries[name]
        except KeyError:
            raise GalleryNotFound(f"no gallery named {name!r}") from None

    def create(self, name: str, dim: int, index_type: str = "flat") -> GalleryInfo:
        check_new_gallery(name, dim, index_type, max_dim=65536)
        with self.lock:
            if name in self.galleries:
                raise GalleryExists(f"gallery {name!r} already exists")
            directory = self.root / name
            if directory.exists():
                leftover = {p.name for p in directory.iterdir()} if directory.is_dir() else None
                if leftover is None or leftover - {"gallery.json.tmp"}:
                    # never delete what this store did not write: it may be anything a user put there
                    raise GalleryExists(f"{directory} exists but is not a gallery (no gallery.json); "
                                        "move it aside or choose another name")
                shutil.rmtree(directory)  # the remains of a create that crashed before it finished
            try:
                directory.mkdir()
                tmp = directory / "gallery.json.tmp"
                tmp.write_text(json.dumps({"dim": dim, "index_type": index_type}))
                os.replace(tmp, directory / "gallery.json")
                fsync_dir(directory)
            except OSError as exc:
                shutil.rmtree(directory, ignore_errors=True)
                raise _storage(exc, f"cannot create gallery {name!r}") from None
            self.galleries[name] = _Gallery(directory, dim, index_type, self.snapshot_every)
            return self.galleries[name].info(name)

    def drop(self, name: str) -> None:
        """Waits for the gallery's calls in progress; calls that reach it later find it dropped."""
        with self.lock:
            gallery = self._get(name)
            with gallery.lock.write():
                gallery.wal.close()
                try:
                    shutil.rmtree(gallery.dir)
                except OSError as exc:
                    raise _storage(exc, f"cannot drop gallery {name!r}") from None
                gallery.dropped = True
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

    def search(self, name, queries, top_k, filters, rerank=None):
        return self._get(name).search(np.asarray(queries, dtype=np.float32), top_k, filters, rerank)

    def snapshot(self, name: str) -> None:
        self._get(name).snapshot()

    def close(self) -> None:
        for gallery in self.galleries.values():
            gallery.close()
