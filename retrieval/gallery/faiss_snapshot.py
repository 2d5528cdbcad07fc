"""The durable half of a FAISS gallery: its write-ahead log, snapshots, and loading both at start.

A gallery's folder holds ``gallery.json`` (dimension, index type, model), ``snapshot.npz`` (ids,
vectors, metadata; written to a temporary file, fsync'ed and renamed) and ``wal.log`` (every
add/remove since the snapshot). An add or remove is in the log, fsync'ed, before it is applied and
acknowledged. On start a gallery is its snapshot plus the log replayed. A corrupt snapshot stops
the start with a message naming the file (the log alone cannot rebuild what the snapshot held).

Snapshots do not stop a gallery's searches or changes while they write (8 s for a million flat
entries, every ``snapshot_every`` changes, stopped every search before). A snapshot holds the
gallery's lock only to seal the log (``wal.log`` becomes ``wal-<n>.log``, replayed after the
snapshot on start until a snapshot covering it lands) and to note which rows it saves; it then
writes those rows while searches and changes go on (changes into a new ``wal.log``). Automatic
snapshots run in a thread of their own, so the change that triggers one does not wait for it.

HNSW galleries also save their graph, ``hnsw-<token>.faiss``, written before the snapshot that
names it: building the graph anew took about 0.45 ms per entry on 2 cores (7 minutes at a million),
reading it back a few milliseconds per 10,000. Their snapshots keep removed rows (marked dead, as
in memory) until a compaction, so the graph's nodes stay the snapshot's rows. A missing or
unusable graph is rebuilt from the rows, with a warning: it holds nothing the snapshot does not.

``gallery.json`` carries the folder's format number (``FORMAT``; absent = 1, as written before the
number was kept). A later version that writes what this one cannot read (a new kind of log record,
a snapshot field that changes what rows mean) raises it, so that an older reid-serve started on
the folder (a rollback) refuses it by name instead of misreading it. Likewise a log record of an
unknown kind stops the start: applied as some other kind, it would change the gallery silently.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.gallery.base import EntryMetadata, GalleryError, GalleryNotFound, StorageError
from retrieval.gallery.columns import Column
from retrieval.gallery.wal import WriteAheadLog, fsync_dir

log = logging.getLogger(__name__)

# The gallery folder layout this version writes and the newest it reads (see the module docstring).
FORMAT = 1

# A snapshot compacts an HNSW gallery (drops its removed rows, rebuilds the graph) only when more
# than this share of its rows is dead: the rebuild takes about 0.45 ms per entry on 2 cores (13.5 s
# for 30,000 512-d entries, 7 minutes or more for a million), while dead rows cost only their
# filtering at search time. The rebuild runs beside searches and changes; the rows added meanwhile
# join the new index in rounds, the last of at most this many rows under the gallery's lock.
HNSW_COMPACT_DEAD_SHARE = 0.2
CATCH_UP_UNDER_LOCK = 1024
# Rows a snapshot copies out of the live index at a time (to write them, or to build a compaction's
# index), under the gallery's read lock (128 MB of 512-d rows, tens of milliseconds): a change
# waits for one chunk, not for the whole snapshot.
SNAPSHOT_CHUNK = 65_536


def _meta_json(meta: list[EntryMetadata], piece: int = 8192) -> str:
    """The metadata as one JSON list, encoded a piece at a time: ``json.dumps`` holds the GIL for
    the whole of its input (about a second for a million entries), which stalled the searches
    running beside a snapshot."""
    pieces = (json.dumps([m.to_dict() for m in meta[i : i + piece]])[1:-1] for i in range(0, len(meta), piece))
    return "[" + ",".join(pieces) + "]"


def storage_error(exc: OSError, what: str) -> StorageError:
    return StorageError(f"{what}: {exc.strerror or exc}")


@dataclass(eq=False)
class _Frozen:
    """What one snapshot saves, taken under the gallery's write lock together with the log's seal."""

    segment: int  # the sealed log segment it covers, with every one before it
    changes: int  # changes since the previous snapshot: given back if this one fails
    rows: int  # the gallery's rows when it was taken (all of them, dead ones included)
    next_id: int
    ids: np.ndarray
    meta: list[EntryMetadata]
    alive: np.ndarray | None  # None: every saved row is live
    keep: np.ndarray | None = None  # a compaction: which of the ``rows`` it keeps
    index: object = None  # the index saved (an HNSW graph's copy, or a compaction's new index); None: the live flat one
    gpu: object = None  # a compacted flat gallery's new GPU copy
    purge: bool = False  # it compacts because people were removed: asked again if it fails


class Persistence:
    """Mixed into a FAISS gallery (``faiss_store._Gallery``), whose rows, index, locks and log it
    reads and writes: how its changes are logged, and how it is snapshotted and loaded again."""

    def _load(self) -> None:
        snap = self.dir / "snapshot.npz"
        graph, covered = "", 0
        if snap.exists():
            try:
                with np.load(snap, allow_pickle=False) as data:
                    ids, vectors, meta = data["ids"], data["vectors"], json.loads(str(data["meta"]))
                    next_id = int(data["next_id"]) if "next_id" in data.files else 1  # absent before it was kept
                    alive = data["alive"].astype(bool) if "alive" in data.files else None  # all live when absent
                    graph = str(data["graph"]) if "graph" in data.files else ""
                    covered = int(data["sealed"]) if "sealed" in data.files else 0  # log segments it holds
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
        for number, segment in self._segments():
            self._next_segment = max(self._next_segment, number + 1)
            if number <= covered:  # a crash after its snapshot landed, before the segment was deleted
                try:
                    segment.unlink()
                except OSError as exc:  # a read-only filesystem: it holds nothing the snapshot does not
                    log.warning("gallery %s: cannot delete %s, which its snapshot covers (%s); not replayed",
                                self.dir.name, segment.name, exc.strerror or exc)
                continue
            for payload in WriteAheadLog(segment).replay():  # sealed by a snapshot that did not land
                self._apply(payload)
                replayed += 1
        self._next_segment = max(self._next_segment, covered + 1)
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
        self.index, self._vectors = index, Column(np.float32, self.dim)  # the graph holds them now
        log.info("gallery %s: read its HNSW graph over %d rows in %.2f s", self.dir.name, len(self.ids),
                 time.perf_counter() - start)

    def _segments(self) -> list[tuple[int, Path]]:
        """The sealed log segments on disk, oldest first."""
        found = []
        for path in self.dir.glob("wal-*.log"):
            number = path.stem[len("wal-"):]
            if number.isdigit():
                found.append((int(number), path))
        return sorted(found)

    def _write_graph(self, index) -> str:
        """Save the HNSW graph ``index`` (fsync'ed) under a new name and return it; "" when it
        cannot be written: the snapshot then goes without it, and the next start rebuilds the graph."""
        name = f"hnsw-{secrets.token_hex(8)}.faiss"
        tmp = self.dir / (name + ".tmp")
        try:
            self.faiss.write_index(index, str(tmp))
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
        elif op["op"] == "remove":
            self._apply_remove(ids)
        else:  # once read as a removal: a newer version's record would have deleted entries
            raise GalleryError(f"gallery {self.dir.name}: its log holds a change of kind {op['op']!r}, which this "
                               "version of reid does not know (a newer one wrote it?); refusing to start: run the "
                               "version that wrote it")

    def _log(self, payload: bytes) -> None:
        try:
            self.wal.append(payload)
        except OSError as exc:
            raise storage_error(exc, f"cannot write the log of gallery {self.dir.name}") from None

    def snapshot(self) -> None:
        """Write the rows (and an HNSW gallery's graph) atomically, then delete the log they cover.

        Removed rows are dropped first, except in an HNSW gallery with at most
        HNSW_COMPACT_DEAD_SHARE of them: there they are saved marked dead, beside the graph that
        still holds them. Searches and changes go on while the rows are written (see the module's
        docstring); a compaction's new index replaces the live one once it has caught up.
        """
        with self._snapshot_lock:
            with self._changes, self.lock.write():  # never between the parts of an add: the log holds all of it
                self._require_open()
                frozen = self._freeze()
            graph, tmp = "", self.dir / "snapshot.npz.tmp"
            try:
                if frozen.keep is not None:
                    self._build(frozen)
                if self.index_type == "hnsw":
                    graph = self._write_graph(frozen.index)
                self._write_rows(frozen, graph, tmp)
                if frozen.keep is not None:
                    self._adopt(frozen)
                os.replace(tmp, self.dir / "snapshot.npz")
                fsync_dir(self.dir)
            except BaseException as exc:
                tmp.unlink(missing_ok=True)
                if graph:  # the snapshot on disk still names the graph before this one
                    (self.dir / graph).unlink(missing_ok=True)
                with self.lock.write():
                    self.changes_since_snapshot += frozen.changes  # its log segment is still there
                    self._purge |= frozen.purge
                if isinstance(exc, OSError):
                    raise storage_error(exc, f"cannot write the snapshot of gallery {self.dir.name}") from None
                raise
            for number, segment in self._segments():
                if number <= frozen.segment:
                    segment.unlink(missing_ok=True)
            for old in self.dir.glob("hnsw-*.faiss*"):  # older graphs, and a crashed write's leftovers
                if old.name != graph:
                    old.unlink(missing_ok=True)

    def _freeze(self) -> _Frozen:
        """Under the write lock: seal the log and note what the snapshot saves. Rows are only ever
        appended and marked dead, so the vectors of the rows up to ``rows`` stay as they are while
        it reads them; copied here: the marks, the metadata list, and an HNSW graph that it saves
        as it is (a concurrent add changes the graph's links)."""
        rows = len(self.ids)
        dead = rows - int(self.alive.sum())
        purge, self._purge = self._purge, False
        compact = dead > 0 and (purge or self.index_type != "hnsw" or dead > HNSW_COMPACT_DEAD_SHARE * rows)
        segment = self._next_segment
        try:
            self.wal.seal(self.dir / f"wal-{segment:08d}.log")
        except OSError as exc:
            raise storage_error(exc, f"cannot seal the log of gallery {self.dir.name}") from None
        self._next_segment += 1
        frozen = _Frozen(segment, self.changes_since_snapshot, rows, self.next_id, self.ids.copy(), list(self.meta),
                         None if not dead else self.alive.copy(), purge=purge)
        self.changes_since_snapshot = 0
        if compact:
            keep = self.alive.copy()
            frozen.keep, frozen.alive, frozen.ids = keep, None, frozen.ids[keep]
            frozen.meta = [m for m, live in zip(frozen.meta, keep) if live]
        elif self.index_type == "hnsw":
            frozen.index = self.faiss.clone_index(self.index)  # 0.13 s for 100,000 512-d entries
        return frozen

    def _build(self, frozen: _Frozen) -> None:
        """The compacted rows' new index (minutes for a large HNSW gallery), fed from the live index
        a chunk at a time under its read lock: a copy of every kept row under the write lock took
        0.8 s at a million 512-d entries, and twice their memory."""
        frozen.index, frozen.gpu = self._new_index(np.empty((0, self.dim), dtype=np.float32))
        for part in self._live_rows(frozen.rows, frozen.keep):
            self._add_to(frozen.index, frozen.gpu, part)

    def _write_rows(self, frozen: _Frozen, graph: str, tmp: Path) -> None:
        """Write the frozen rows to ``tmp``, fsync'ed, as ``np.savez`` lays them out; the vectors
        come from the saved index, or chunk by chunk from the live flat index."""
        arrays = {"ids": frozen.ids, "next_id": np.int64(frozen.next_id), "graph": np.array(graph),
                  "meta": np.array(_meta_json(frozen.meta)), "sealed": np.int64(frozen.segment)}
        if frozen.alive is not None:
            arrays["alive"] = frozen.alive
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, array in arrays.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, np.asanyarray(array), allow_pickle=False)
                with archive.open("vectors.npy", "w", force_zip64=True) as out:
                    rows = len(frozen.ids)
                    np.lib.format.write_array_header_2_0(
                        out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                              "shape": (rows, self.dim)})
                    for chunk in self._saved_vectors(frozen, rows):
                        out.write(np.ascontiguousarray(chunk, dtype=np.float32).data)
            f.flush()
            os.fsync(f.fileno())

    def _saved_vectors(self, frozen: _Frozen, rows: int):
        """The vectors of the ``rows`` saved rows, in chunks."""
        if frozen.index is not None:  # the snapshot's own index: nothing else touches it
            yield self._stored(frozen.index)[:rows]
            return
        yield from self._live_rows(rows)

    def _live_rows(self, stop: int, keep: np.ndarray | None = None):
        """Copies of the live index's rows before ``stop`` (those in ``keep``, if given),
        SNAPSHOT_CHUNK rows at a time, each copied under the read lock: the index may grow, and
        move its storage, between chunks."""
        for start in range(0, stop, SNAPSHOT_CHUNK):
            end = min(stop, start + SNAPSHOT_CHUNK)
            with self.lock.read():
                part = self.vectors[start:end].copy() if keep is None else self.vectors[start:end][keep[start:end]]
            yield part

    def _adopt(self, frozen: _Frozen) -> None:
        """Make a compaction's index the live one: it takes the rows added since the freeze, most
        of them without the lock, then the last few and the swap under the write lock. Rows
        removed meanwhile stay in it, marked dead, as in any index."""
        index, gpu, done = frozen.index, frozen.gpu, frozen.rows
        for _ in range(8):  # adds as fast as it catches up would keep it going: then finish under the lock
            with self.lock.read():
                tail = self.vectors[done:].copy()
            if len(tail) <= CATCH_UP_UNDER_LOCK:
                break
            self._add_to(index, gpu, tail)
            done += len(tail)
        with self.lock.write():
            self._add_to(index, gpu, self.vectors[done:])
            keep = np.concatenate([frozen.keep, np.ones(len(self.ids) - frozen.rows, dtype=bool)])
            self.meta = [m for m, live in zip(self.meta, keep) if live]
            for column in (self._ids, self._cams.column, self._times, self._alive,
                           *(c.column for c in self._label_columns.values())):
                column.keep(keep)
            alive = self.alive
            self.row = dict(zip(self.ids[alive].tolist(), np.flatnonzero(alive).tolist()))
            self.index, self._gpu = index, gpu

    def _after_change(self, n: int, purge: bool = False) -> None:
        """Under the write lock: start an automatic snapshot every ``snapshot_every`` changes, or at
        once for a purge, in a thread of its own (one at a time; it runs again for a purge, or
        ``snapshot_every`` changes, made after it froze its rows)."""
        self.changes_since_snapshot += n
        self._purge |= purge
        running = self._snapshot_thread is not None and self._snapshot_thread.is_alive()
        if (self.changes_since_snapshot >= self.snapshot_every or self._purge) and not running:
            thread = threading.Thread(target=self._snapshot_in_background, daemon=True, name=f"snapshot {self.dir.name}")
            try:
                thread.start()
            except RuntimeError as exc:  # no thread to be had: the change is done and logged, so it must not fail
                log.warning("gallery %s: cannot start an automatic snapshot (%s); the next change tries again",
                            self.dir.name, exc)
                return
            self._snapshot_thread = thread

    def _snapshot_in_background(self) -> None:
        while True:
            try:
                self.snapshot()
            except GalleryNotFound:  # dropped before it began
                return
            except StorageError as exc:  # the changes themselves are durable in the log
                log.warning("%s", exc)
                return
            except Exception:  # noqa: BLE001 - a thread's error would otherwise vanish; the log still holds every change
                log.exception("gallery %s: automatic snapshot failed", self.dir.name)
                return
            # Again while one is due: the changes made as it wrote (a purge, or snapshot_every more)
            # started none, and would otherwise wait for a change to come. As _after_change decides,
            # one from now on starts a thread.
            with self.lock.write():
                if not (self._purge or self.changes_since_snapshot >= self.snapshot_every) or self.dropped:
                    if self._snapshot_thread is threading.current_thread():
                        self._snapshot_thread = None
                    return

    def settle(self) -> None:
        """Wait for an automatic snapshot in progress."""
        thread = self._snapshot_thread
        if thread is not None:
            thread.join()
