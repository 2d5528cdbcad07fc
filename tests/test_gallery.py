"""Gallery stores: brute-force agreement, filters, validation, re-ranking and HNSW recall on every
backend (FAISS, and Milvus through Milvus Lite); FAISS durability (log, snapshot) at the end."""
from __future__ import annotations

import json
import logging
import math
import shutil
import sys

import numpy as np
import pytest

from retrieval.distance import l2_normalize
from retrieval.gallery import (
    EntryMetadata, FaissGalleryStore, GalleryError, GalleryExists, GalleryNotFound, InvalidEntry, RerankOptions,
    SearchFilter,
)
from retrieval.rerank import k_reciprocal_rerank
from tests.conftest import close_milvus_store, open_milvus_store

BACKENDS = ["faiss", "milvus"]


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    if request.param == "faiss":
        s = FaissGalleryStore(tmp_path / "faiss")
        yield s
        s.close()
    else:
        s = open_milvus_store(tmp_path)  # Milvus Lite, or the server in REID_MILVUS_URI
        yield s
        close_milvus_store(s)


def _data(n=200, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    meta = [EntryMetadata(person_id=str(i % 20), camera_id=f"c{i % 3}", timestamp=float(i), labels={"site": "a" if i % 2 else "b"})
            for i in range(n)]
    return vecs, meta


def test_search_equals_brute_force_cosine(store):
    store.create("g", 16)
    vecs, meta = _data()
    ids = store.add("g", np.zeros(len(vecs), dtype=np.int64), vecs, meta)
    queries = np.random.default_rng(9).normal(size=(7, 16)).astype(np.float32)
    hits = store.search("g", queries, 15, [SearchFilter()])
    sims = l2_normalize(queries) @ l2_normalize(vecs).T
    for q, row in enumerate(hits):
        expected = ids[np.argsort(-sims[q], kind="stable")[:15]]
        assert [h.id for h in row] == expected.tolist()
        np.testing.assert_allclose([h.score for h in row], np.sort(sims[q])[::-1][:15], atol=1e-5)


def test_filters(store):
    store.create("g", 16)
    vecs, meta = _data()
    store.add("g", np.arange(1, 201), vecs, meta)
    q = vecs[:2]
    for flt, ok in [
        (SearchFilter(exclude_camera_id="c0"), lambda m: m.camera_id != "c0"),
        (SearchFilter(time_from=50, time_to=120), lambda m: 50 <= m.timestamp <= 120),
        (SearchFilter(labels={"site": "a"}), lambda m: m.labels["site"] == "a"),
    ]:
        hits = store.search("g", q, 30, [flt])
        sims = l2_normalize(q) @ l2_normalize(vecs).T
        for qi, row in enumerate(hits):
            allowed = [i for i in range(200) if ok(meta[i])]
            expected = [allowed[j] + 1 for j in np.argsort(-sims[qi][allowed], kind="stable")[:30]]
            assert [h.id for h in row] == expected
    per_query = store.search("g", q, 5, [SearchFilter(exclude_camera_id="c0"), SearchFilter(exclude_camera_id="c1")])
    assert all(h.metadata.camera_id != "c0" for h in per_query[0]) and all(h.metadata.camera_id != "c1" for h in per_query[1])


def test_validation_errors(store):
    store.create("g", 4)
    with pytest.raises(GalleryExists):
        store.create("g", 4)
    with pytest.raises(InvalidEntry, match="name"):
        store.create("../evil", 4)
    with pytest.raises(GalleryNotFound):
        store.search("nope", np.ones((1, 4)), 3, [])
    store.add("g", np.array([5]), np.ones((1, 4)), [EntryMetadata()])
    with pytest.raises(InvalidEntry, match="4-d embeddings, got 3-d"):
        store.add("g", np.array([0]), np.ones((1, 3)), [EntryMetadata()])
    with pytest.raises(InvalidEntry, match="NaN or inf"):
        store.add("g", np.array([0]), np.array([[1, np.nan, 0, 0]]), [EntryMetadata()])
    with pytest.raises(InvalidEntry, match="embedding 1 is all zeros"):
        store.add("g", np.array([0, 0]), np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), [EntryMetadata()] * 2)
    assert store.info("g").size == 1  # nothing of the refused request was added
    with pytest.raises(InvalidEntry, match="entry 0 has timestamp inf; timestamps must be finite"):
        store.add("g", np.array([0]), np.ones((1, 4)), [EntryMetadata(timestamp=float("inf"))])
    with pytest.raises(InvalidEntry, match="query embedding 0 is all zeros"):
        store.search("g", np.zeros((1, 4)), 3, [])
    with pytest.raises(InvalidEntry, match="filter 1: time_from 5.0 is after time_to 1.0"):
        store.search("g", np.ones((2, 4)), 3, [SearchFilter(), SearchFilter(time_from=5.0, time_to=1.0)])
    assert store.search("g", np.ones((1, 4)), 3, [SearchFilter(time_from=5.0)]) == [[]]  # open end: fine
    with pytest.raises(InvalidEntry, match="filter 0: time_from and time_to must be finite, got nan"):
        store.search("g", np.ones((1, 4)), 3, [SearchFilter(time_from=float("nan"))])
    with pytest.raises(GalleryExists, match=r"\[5\]"):
        store.add("g", np.array([5]), np.ones((1, 4)), [EntryMetadata()])
    store.add("g", np.array([5]), -np.ones((1, 4)), [EntryMetadata(person_id="new")], replace=True)
    assert store.info("g").size == 1
    assert store.search("g", -np.ones((1, 4)), 1, [])[0][0].metadata.person_id == "new"
    with pytest.raises(InvalidEntry, match="repeats an id"):
        store.add("g", np.array([7, 7]), np.ones((2, 4)), [EntryMetadata()] * 2)


def test_filters_match_any_text_exactly(store):
    """Camera ids and label values with quotes, backslashes, line breaks, control characters and
    non-ASCII letters: Milvus refused JSON's \\u escapes in its filter expressions (UNAVAILABLE)."""
    texts = ["entrée", 'a"b', "a\\b", "x\\", "nl\nx", "cr\rx", "ctl\x01x", "\\u0041", "quote'x", "emoji😀"]
    store.create("g", 4)
    vecs = np.ones((len(texts), 4), np.float32) + np.arange(len(texts))[:, None] * np.array([0, 0.1, 0, 0], np.float32)
    store.add("g", np.arange(1, len(texts) + 1), vecs, [EntryMetadata("p", t, 1.0, {"k": t}) for t in texts])
    for i, text in enumerate(texts, start=1):
        excluded = store.search("g", vecs[:1], len(texts), [SearchFilter(exclude_camera_id=text)])[0]
        assert sorted(h.id for h in excluded) == [j for j in range(1, len(texts) + 1) if j != i], repr(text)
        labelled = store.search("g", vecs[:1], len(texts), [SearchFilter(labels={"k": text})])[0]
        assert [(h.id, h.metadata.camera_id) for h in labelled] == [(i, text)], repr(text)


def test_long_ids_are_refused_the_same_way_by_every_backend(store):
    """Milvus stores person_id and camera_id as VARCHAR(512) and refused longer ones at insert, as
    UNAVAILABLE, which clients retry; every backend now refuses them up front."""
    store.create("g", 4)
    fits = "é" * 256  # 512 bytes in UTF-8
    store.add("g", np.array([1]), np.ones((1, 4)), [EntryMetadata(fits, "c" * 512)])
    with pytest.raises(InvalidEntry, match="entry 1: person_id is 513 bytes long; at most 512"):
        store.add("g", np.array([2, 3]), np.ones((2, 4)), [EntryMetadata(), EntryMetadata(fits + "x")])
    with pytest.raises(InvalidEntry, match="entry 0: camera_id is 513 bytes long"):
        store.add("g", np.array([2]), np.ones((1, 4)), [EntryMetadata(camera_id="c" * 513)])
    assert store.info("g").size == 1
    assert store.search("g", np.ones((1, 4)), 1, [])[0][0].metadata.person_id == fits


def test_milvus_refuses_gallery_names_too_long_for_a_collection(tmp_path):
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    store = open_milvus_store(tmp_path)
    try:
        store.create("n" * 125, 4)  # the longest that fits Milvus's 255-character collection names
        with pytest.raises(InvalidEntry, match="126 characters; Milvus galleries allow at most 125"):
            store.create("n" * 126, 4)
        assert [g.name for g in store.list()] == ["n" * 125]
    finally:
        close_milvus_store(store)


def test_creating_a_milvus_lite_gallery_logs_no_error(tmp_path, caplog):
    """pymilvus asks Milvus Lite for a method it lacks and goes on; gRPC logged an ERROR traceback
    in the server's log at every CreateGallery."""
    store = open_milvus_store(tmp_path)
    try:
        with caplog.at_level(logging.ERROR):
            store.create("g", 4, "hnsw")
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    finally:
        close_milvus_store(store)


def test_only_the_methods_milvus_lite_lacks_leave_its_log():
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from retrieval.gallery.milvus_store import _not_a_method_milvus_lite_lacks

    def record_of(code: str, filename: str) -> logging.LogRecord:
        try:
            exec(compile(code, filename, "exec"))
        except Exception:  # noqa: BLE001 - whatever the code raised, as gRPC's server catches it
            return logging.LogRecord("grpc._server", logging.ERROR, filename, 1, "Exception calling application",
                                     None, sys.exc_info())
        raise AssertionError("raised nothing")

    assert not _not_a_method_milvus_lite_lacks(record_of("raise NotImplementedError('x')", "milvus_pb2_grpc.py"))
    assert _not_a_method_milvus_lite_lacks(record_of("raise NotImplementedError('x')", "servicer.py"))
    assert _not_a_method_milvus_lite_lacks(record_of("raise ValueError('x')", "milvus_pb2_grpc.py"))
    assert _not_a_method_milvus_lite_lacks(logging.LogRecord("grpc._server", logging.ERROR, "f", 1, "plain", None, None))


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_restart_replays_log_and_snapshot(tmp_path, index_type):
    vecs, meta = _data(60)
    store = FaissGalleryStore(tmp_path, snapshot_every=25)
    store.create("g", 16, index_type)
    for start in range(0, 60, 10):
        store.add("g", np.arange(start + 1, start + 11), vecs[start:start + 10], meta[start:start + 10])
    store.settle()  # automatic snapshots run in a thread of their own
    store.remove("g", np.array([3, 4, 55]))
    assert (tmp_path / "g" / "snapshot.npz").exists() and (tmp_path / "g" / "wal.log").stat().st_size > 0
    before = store.search("g", vecs[:5], 10, [])
    # no close(): a crash; the reopened store must rebuild from snapshot + log
    reopened = FaissGalleryStore(tmp_path)
    assert reopened.info("g").size == 57
    after = reopened.search("g", vecs[:5], 10, [])
    assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
    assert all(h.id not in (3, 4, 55) for r in after for h in r)


def test_torn_log_tail_is_dropped_with_a_warning(tmp_path, caplog):
    vecs, meta = _data(20)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16)
    store.add("g", np.arange(1, 11), vecs[:10], meta[:10])
    store.add("g", np.arange(11, 21), vecs[10:], meta[10:])
    log = tmp_path / "g" / "wal.log"
    data = log.read_bytes()
    log.write_bytes(data[:-37])  # the second record was cut short by a crash
    reopened = FaissGalleryStore(tmp_path)
    assert reopened.info("g").size == 10
    assert "torn or corrupt tail" in caplog.text
    reopened.add("g", np.arange(11, 13), vecs[10:12], meta[10:12])  # the log keeps working
    assert FaissGalleryStore(tmp_path).info("g").size == 12


def test_a_torn_tail_that_cannot_be_cut_at_start_is_cut_before_the_next_change(tmp_path, monkeypatch, caplog):
    """On a read-only filesystem the cut of a torn log tail at start raised, and the galleries did
    not open even for searches. Now the cut waits for the next change, so that no record written
    later follows the torn one (replay stops there, and would drop it)."""
    import errno

    from retrieval.gallery.wal import WriteAheadLog

    vecs, meta = _data(12)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16)
    store.add("g", np.arange(1, 11), vecs[:10], meta[:10])
    log = tmp_path / "g" / "wal.log"
    log.write_bytes(log.read_bytes() + b"\x01torn")  # a crash mid-append; no close()
    real_cut = WriteAheadLog._cut

    def read_only(self, size):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(WriteAheadLog, "_cut", read_only)
    reopened = FaissGalleryStore(tmp_path)
    assert reopened.info("g").size == 10 and len(reopened.search("g", vecs[:1], 3, [])[0]) == 3
    assert "cannot cut that tail off now (Read-only file system)" in caplog.text
    monkeypatch.setattr(WriteAheadLog, "_cut", real_cut)  # writable again
    reopened.add("g", np.arange(11, 13), vecs[10:12], meta[10:12])
    assert not log.read_bytes().endswith(b"\x01torn")
    assert FaissGalleryStore(tmp_path).info("g").size == 12  # as after a crash: the new records replay


_DISK_FULL = """
import resource, signal, sys
from pathlib import Path
import numpy as np
from retrieval.gallery import EntryMetadata, FaissGalleryStore, StorageError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
store = FaissGalleryStore(sys.argv[1])
store.create("g", 64)
vecs = np.random.default_rng(0).normal(size=(3, 64))
store.add("g", np.array([1]), vecs[:1], [EntryMetadata()])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, ((Path(sys.argv[1]) / "g" / "wal.log").stat().st_size + 100, hard))
try:
    store.add("g", np.array([2]), vecs[1:2], [EntryMetadata()])  # cut after 100 of its bytes
except StorageError as exc:
    print("refused:", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
store.add("g", np.array([3]), vecs[2:], [EntryMetadata()])
print("acknowledged 3")
"""


def test_a_write_that_fails_part_way_loses_no_later_record(tmp_path):
    """A disk-full error mid-record left its torn bytes in the log: the store then reported a raw
    OSError, refused every later write ("write to closed file"), and a restart would have dropped
    every record after the torn one, acknowledged or not."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _DISK_FULL, str(tmp_path)], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused: cannot write the log of gallery g: File too large", "acknowledged 3"]
    reopened = FaissGalleryStore(tmp_path)
    assert sorted(h.id for h in reopened.search("g", np.ones((1, 64)), 10, [])[0]) == [1, 3]


def test_a_torn_record_that_cannot_be_cut_at_once_is_cut_before_the_next_append(tmp_path, monkeypatch):
    import os

    from retrieval.gallery.wal import WriteAheadLog

    wal = WriteAheadLog(tmp_path / "wal.log")
    wal.append(b"first")
    real_write, real_truncate = os.write, os.ftruncate

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    def refuse(fd, size):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "write", half_then_full)
    monkeypatch.setattr(os, "ftruncate", refuse)
    with pytest.raises(OSError, match="No space left"):
        wal.append(b"second")
    monkeypatch.setattr(os, "write", real_write)
    with pytest.raises(OSError, match="Input/output error"):  # still cannot cut it: nothing is written after it
        wal.append(b"third")
    monkeypatch.setattr(os, "ftruncate", real_truncate)
    wal.append(b"fourth")
    assert list(WriteAheadLog(tmp_path / "wal.log").replay()) == [b"first", b"fourth"]


def test_changes_to_many_galleries_hold_no_file_open(tmp_path):
    """Each gallery's log was held open after its first change: at about a thousand galleries the
    server ran out of file descriptors (1,024 by default), and every later change failed."""
    import subprocess
    from pathlib import Path

    code = f"""
import os, resource
import numpy as np
from retrieval.gallery import FaissGalleryStore
from retrieval.gallery.base import EntryMetadata
resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
store = FaissGalleryStore({str(tmp_path)!r})
before = len(os.listdir("/proc/self/fd"))
for i in range(200):
    store.create(f"g{{i}}", 4)
    store.add(f"g{{i}}", np.array([1]), np.ones((1, 4)), [EntryMetadata()])
print(len(os.listdir("/proc/self/fd")) - before, sum(store.info(f"g{{i}}").size for i in range(200)))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    opened, entries = map(int, result.stdout.split())
    assert opened <= 2 and entries == 200


def test_a_log_torn_in_its_first_record_is_emptied_and_takes_new_records(tmp_path, caplog):
    """A crash during a log's very first append leaves nothing intact: all of it is cut (to 0 bytes,
    not 1), so that the next record starts the file and is read back; a clean log says nothing."""
    from retrieval.gallery.wal import WriteAheadLog

    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.append(b"one")
    wal.append(b"two")
    with caplog.at_level(logging.WARNING):
        assert list(WriteAheadLog(path).replay()) == [b"one", b"two"]
    assert not caplog.records  # nothing torn, nothing said
    path.write_bytes(path.read_bytes()[:7])  # the first record's header cut short
    wal = WriteAheadLog(path)
    with caplog.at_level(logging.WARNING):
        assert list(wal.replay()) == []
    assert "dropped a torn or corrupt tail of 7 bytes" in caplog.text
    assert path.stat().st_size == 0
    wal.append(b"three")
    assert list(WriteAheadLog(path).replay()) == [b"three"]
    wal.append(b"four")
    path.write_bytes(path.read_bytes()[:-3])  # 16 bytes of record four, 13 left
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert list(WriteAheadLog(path).replay()) == [b"three"]
    assert "dropped a torn or corrupt tail of 13 bytes" in caplog.text


def test_a_new_log_file_is_synced_into_its_folder_before_its_first_record(tmp_path, monkeypatch):
    """Each snapshot seals the log, and the next change creates a new one: an fsync of the file
    alone does not make its name durable, so a power loss could take every record in it."""
    from retrieval.gallery import wal

    store = FaissGalleryStore(tmp_path)
    store.create("g", 4)
    log = tmp_path / "g" / "wal.log"
    synced, real = [], wal.fsync_dir
    monkeypatch.setattr(wal, "fsync_dir", lambda path: (synced.append((path, log.exists() and log.stat().st_size)), real(path)))
    store.add("g", np.array([1]), np.ones((1, 4)), [EntryMetadata()])
    assert synced == [(tmp_path / "g", 0)]  # a new gallery's first log: created, its folder synced, then the record
    store.snapshot("g")  # wal.log sealed and deleted
    assert not log.exists()
    synced.clear()
    store.add("g", np.array([2]), np.ones((1, 4)), [EntryMetadata()])
    assert synced == [(tmp_path / "g", 0)]  # created, its folder synced, then the record written
    store.add("g", np.array([3]), np.ones((1, 4)), [EntryMetadata()])
    assert len(synced) == 1  # once per file


def test_create_never_deletes_a_folder_it_did_not_write(tmp_path):
    """A failed create removed its directory, also one that existed before: a folder of the same
    name in the gallery root, with whatever it held, was deleted."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "data.txt").write_text("precious")
    (tmp_path / "crashed").mkdir()  # a create that crashed before its gallery.json was renamed into place
    (tmp_path / "crashed" / "gallery.json.tmp").write_text('{"dim": 8')
    store = FaissGalleryStore(tmp_path)
    with pytest.raises(GalleryExists, match="keep exists but is not a gallery"):
        store.create("keep", 8)
    assert (tmp_path / "keep" / "data.txt").read_text() == "precious"
    assert store.create("crashed", 8).dim == 8 and store.info("crashed").size == 0


def test_a_name_that_differs_only_in_case_is_refused_naming_the_gallery_it_would_share(tmp_path):
    """On a file system that ignores case (macOS, Windows) 'Lobby' is the folder of 'lobby': the
    create was refused as "not a gallery (no gallery.json)", though it held one. Where tmp_path tells
    case apart, shown as such a file system would show the folder; run with ``--basetemp`` on one that
    does not (checked on exFAT), it is the real thing."""
    store = FaissGalleryStore(tmp_path)
    store.create("lobby", 8)
    caseless = (tmp_path / "Lobby").exists()
    if not caseless:
        (tmp_path / "Lobby").mkdir()
        shutil.copy(tmp_path / "lobby" / "gallery.json", tmp_path / "Lobby" / "gallery.json")
    with pytest.raises(GalleryExists, match="gallery 'Lobby' would share its folder with gallery 'lobby': "
                                            "the file system under .* does not tell names apart by case"):
        store.create("Lobby", 8)
    assert store.info("lobby").dim == 8
    if not caseless:  # there, LOBBY is lobby's folder too
        (tmp_path / "LOBBY").write_text("a file, not a folder")  # no gallery's: the plain refusal
        with pytest.raises(GalleryExists, match="LOBBY exists but is not a gallery"):
            store.create("LOBBY", 8)


def test_unreadable_gallery_config_refuses_to_start_naming_it(tmp_path):
    store = FaissGalleryStore(tmp_path)
    store.create("g", 4)
    store.close()
    (tmp_path / "g" / "gallery.json").write_text('{"dim": 4')
    with pytest.raises(GalleryError, match=r"g/gallery.json is unreadable .*refusing to start"):
        FaissGalleryStore(tmp_path)
    (tmp_path / "g" / "gallery.json").write_text('{"dim": 4, "index_type": "ivf"}')  # loaded as flat before
    with pytest.raises(GalleryError, match=r"g/gallery.json is unreadable \(dim 4 and index_type 'ivf'\)"):
        FaissGalleryStore(tmp_path)


def test_a_gallery_written_by_a_newer_version_is_refused_not_misread(tmp_path):
    """A log record of a kind this version does not know was applied as a removal; a folder in a
    newer format would have been read as this one's."""
    import struct
    import zlib

    store = FaissGalleryStore(tmp_path)
    store.create("g", 4)
    store.add("g", np.array([1, 2]), np.eye(2, 4), [EntryMetadata()] * 2)
    store.close()
    config = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert config["format"] == 1
    header = json.dumps({"op": "merge", "ids": [1, 2]}).encode()
    payload = len(header).to_bytes(4, "little") + header
    wal = tmp_path / "g" / "wal.log"
    record = b"RWAL" + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    wal.write_bytes(wal.read_bytes() + record if wal.exists() else record)
    before = wal.read_bytes()
    with pytest.raises(GalleryError, match="gallery g: its log holds a change of kind 'merge', which this version"):
        FaissGalleryStore(tmp_path)
    assert wal.read_bytes() == before  # nothing cut from the log it refused
    wal.unlink()
    assert FaissGalleryStore(tmp_path).info("g").size == 2  # the entries were never touched
    (tmp_path / "g" / "gallery.json").write_text(json.dumps({**config, "format": 2}))
    with pytest.raises(GalleryError, match="gallery g is in format 2, written by a newer version of reid; this one reads format 1"):
        FaissGalleryStore(tmp_path)
    del config["format"]  # as written before the number was kept
    (tmp_path / "g" / "gallery.json").write_text(json.dumps(config))
    assert FaissGalleryStore(tmp_path).info("g").size == 2


def test_assigned_ids_are_never_reused(tmp_path):
    """Ids came from the largest id present: once a removal of the largest was compacted away (by a
    snapshot, or a restart), the next add handed it out again, to another person."""
    one = [EntryMetadata()]
    store = FaissGalleryStore(tmp_path)
    store.create("g", 4)
    assert store.add("g", np.zeros(3, np.int64), np.eye(3, 4), one * 3).tolist() == [1, 2, 3]
    store.remove("g", np.array([3]))
    store.snapshot("g")  # compacts the removed row away
    assert store.add("g", np.array([0]), np.ones((1, 4)), one).tolist() == [4]
    store.remove("g", np.array([4]))  # in the log only, then a crash: no close()
    reopened = FaissGalleryStore(tmp_path)
    assert reopened.add("g", np.array([0]), np.ones((1, 4)), one).tolist() == [5]
    reopened.remove("g", np.array([5]))
    reopened.close()  # a snapshot: the log is emptied
    again = FaissGalleryStore(tmp_path)
    assert again.add("g", np.array([0]), np.ones((1, 4)), one).tolist() == [6]
    assert again.add("g", np.array([0, 10]), np.ones((2, 4)), one * 2).tolist() == [11, 10]  # above a given id too
    again.close()
    snap = tmp_path / "g" / "snapshot.npz"
    with np.load(snap) as data:  # a snapshot from before the mark was kept still loads
        old = {k: data[k] for k in data.files if k != "next_id"}
    np.savez(snap, **old)
    assert FaissGalleryStore(tmp_path).add("g", np.array([0]), np.ones((1, 4)), one).tolist() == [12]


def test_corrupt_snapshot_refuses_to_start(tmp_path):
    store = FaissGalleryStore(tmp_path)
    store.create("g", 4)
    store.add("g", np.array([1]), np.ones((1, 4)), [EntryMetadata()])
    store.close()
    (tmp_path / "g" / "snapshot.npz").write_bytes(b"garbage")
    with pytest.raises(GalleryError, match="snapshot .* is corrupt"):
        FaissGalleryStore(tmp_path)


def test_a_call_that_outlives_a_drop_cannot_write_into_a_new_gallery_of_that_name(tmp_path):
    """A call holds a gallery from before a drop: its log used to reopen at the same path, inside a
    new gallery of the same name, whose restart would then replay a record of the old one's width."""
    import threading

    store = FaissGalleryStore(tmp_path)
    store.create("g", 4)
    stale = store.galleries["g"]
    with stale.lock.read():  # a search in progress: the drop waits for it
        dropping = threading.Thread(target=store.drop, args=("g",))
        dropping.start()
        dropping.join(0.3)
        assert dropping.is_alive() and (tmp_path / "g").exists()
    dropping.join(5)
    assert not (tmp_path / "g").exists()
    store.create("g", 8)
    for call in (lambda: stale.add(np.array([0]), np.ones((1, 4)), [EntryMetadata()], False),
                 lambda: stale.remove(np.array([1])), lambda: stale.search(np.ones((1, 4)), 1, [], None),
                 stale.snapshot):
        with pytest.raises(GalleryNotFound, match="'g' was dropped"):
            call()
    store.add("g", np.array([0]), np.ones((1, 8)), [EntryMetadata()])
    store.close()
    assert FaissGalleryStore(tmp_path).info("g").size == 1  # the new gallery's log replays alone


def test_faiss_searches_of_one_gallery_run_side_by_side_and_changes_alone(tmp_path):
    """One plain lock per gallery made every search wait for the one before (HNSW: 1.6x more
    single-query searches a second with two threads on 2 cores once they overlap)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as ResultTimeout  # not the builtin before Python 3.11

    vecs, meta = _data(50, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, "hnsw")
    store.add("g", np.arange(1, 51), vecs, meta)
    gallery = store.galleries["g"]
    together, search, inside = threading.Barrier(2, timeout=10), gallery._search, threading.Event()

    def search_at_the_barrier(*args):
        together.wait()  # both searches must be in here at once
        inside.set()
        return search(*args)

    gallery._search = search_at_the_barrier
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(store.search, "g", vecs[i:i + 1], 1, []) for i in range(2)]
        assert [a.result()[0][0].id for a in answers] == [1, 2]
    # a change waits for the searches in progress, and searches for a change
    gallery._search = lambda *args: (inside.wait(10), search(*args))[1]
    inside.clear()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(store.search, "g", vecs[:1], 1, [])
        add = pool.submit(store.add, "g", np.array([51]), vecs[:1], meta[:1])
        with pytest.raises(ResultTimeout):
            add.result(timeout=0.3)
        inside.set()
        assert slow.result()[0][0].id == 1 and add.result().tolist() == [51]


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_concurrent_searches_adds_removals_and_snapshots_stay_consistent(tmp_path, index_type):
    """Searches share a gallery and read its vectors in place, in the FAISS index's storage, which
    an add may move: every search must see a whole state, and the gallery must end as its changes say."""
    import threading

    rng = np.random.default_rng(8)
    store = FaissGalleryStore(tmp_path, snapshot_every=40)
    store.create("g", 8, index_type)
    vectors = {i: rng.normal(size=8).astype(np.float32) for i in range(1, 401)}
    meta = {i: EntryMetadata(camera_id=f"c{i % 3}", labels={"site": "ab"[i % 2]}) for i in vectors}
    store.add("g", np.arange(1, 101), np.stack([vectors[i] for i in range(1, 101)]), [meta[i] for i in range(1, 101)])
    removed, errors, stop = set(), [], threading.Event()

    def writer():
        for start in range(101, 401, 20):
            ids = np.arange(start, start + 20)
            store.add("g", ids, np.stack([vectors[i] for i in ids]), [meta[i] for i in ids])
            gone = ids[:5]
            store.remove("g", gone)
            removed.update(gone.tolist())
        stop.set()

    def searcher(seed):
        local = np.random.default_rng(seed)
        flts = [SearchFilter(), SearchFilter(exclude_camera_id="c1"), SearchFilter(labels={"site": "a"})]
        try:
            while not stop.is_set():
                q = local.normal(size=(local.integers(1, 7), 8)).astype(np.float32)
                unit = l2_normalize(q)
                for qi, row in enumerate(store.search("g", q, 10, [flts[local.integers(0, 3)]])):
                    for h in row:  # each hit is a real entry, scored with its own vector
                        assert h.metadata is meta[h.id]
                        assert h.score == pytest.approx(float(l2_normalize(vectors[h.id][None])[0] @ unit[qi]), abs=1e-5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    live = sorted(set(vectors) - removed)
    assert store.info("g").size == len(live)
    q = rng.normal(size=(1, 8)).astype(np.float32)
    hits = store.search("g", q, len(live), [SearchFilter(time_from=-1.0)])[0]  # an exact scan of every live entry
    sims = {i: float(l2_normalize(vectors[i][None])[0] @ l2_normalize(q)[0]) for i in live}
    assert [h.id for h in hits] == sorted(live, key=lambda i: -sims[i])


def test_read_write_lock():
    import threading
    import time

    from retrieval.gallery.rwlock import ReadWriteLock

    lock, log = ReadWriteLock(), []
    with lock.write(), lock.write(), lock.read():  # a writer may take it again, and read
        log.append("nested")
    with lock.read():
        reader_done = threading.Event()

        def second_reader():
            with lock.read():
                reader_done.set()

        threading.Thread(target=second_reader).start()
        assert reader_done.wait(5)  # readers share it
    # a waiting writer holds back new readers: a stream of searches cannot starve a change
    order = []

    def write_after_reader():
        with lock.write():
            order.append("write")

    def late_reader():
        with lock.read():
            order.append("late read")

    with lock.read():
        w = threading.Thread(target=write_after_reader)
        w.start()
        while not lock._writers_waiting:
            time.sleep(0.01)
        r = threading.Thread(target=late_reader)
        r.start()
        time.sleep(0.2)
        assert order == []  # the writer waits for this reader; the late reader waits for the writer
    w.join(5)
    r.join(5)
    assert order == ["write", "late read"] and log == ["nested"]
    # the readers waiting when a writer lets go get in before it writes again: an add applied part
    # by part kept a search out for 7.9 s of its 8.4 s
    parts, reader_in = [], threading.Event()

    def writer_in_parts():
        while not reader_in.is_set() and len(parts) < 200:
            with lock.write():
                parts.append(1)
                time.sleep(0.01)

    w = threading.Thread(target=writer_in_parts)
    w.start()
    while not parts:
        time.sleep(0.001)
    with lock.read():
        reader_in.set()
        got_in_after = len(parts)
    w.join(10)
    assert got_in_after < 10, got_in_after


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_camera_and_label_filters_follow_adds_removals_compaction_and_restarts(tmp_path, index_type):
    """Filters compare integer-coded columns (a label's column is made at its first search and kept
    up to date after): they must keep matching what ``SearchFilter.matches`` says."""
    rng = np.random.default_rng(5)
    store, entries = FaissGalleryStore(tmp_path), {}

    def add(ids, meta):
        vectors = rng.normal(size=(len(ids), 8)).astype(np.float32)
        store.add("g", np.asarray(ids), vectors, meta)
        entries.update(zip(ids, zip(l2_normalize(vectors), meta)))

    def check(flt):
        query = rng.normal(size=(1, 8)).astype(np.float32)
        allowed = sorted((-float(v @ l2_normalize(query)[0]), i) for i, (v, m) in entries.items() if flt.matches(m))
        got = store.search("g", query, 100, [flt])[0]
        assert [h.id for h in got] == [i for _, i in allowed], flt

    filters = [SearchFilter(labels={"site": "a"}), SearchFilter(labels={"zone": "z1"}), SearchFilter(labels={"site": "a", "zone": "z1"}),
               SearchFilter(labels={"nowhere": "x"}), SearchFilter(exclude_camera_id="c1"), SearchFilter(exclude_camera_id="c9"),
               SearchFilter(exclude_camera_id="unknown"), SearchFilter(exclude_camera_id="c0", labels={"site": "b"})]
    store.create("g", 8, index_type)
    add(list(range(1, 31)), [EntryMetadata(camera_id=f"c{i % 3}", labels={"site": "ab"[i % 2]}) for i in range(30)])
    for flt in filters:
        check(flt)
    add(list(range(31, 41)), [EntryMetadata(camera_id="c9", labels={"site": "a", "zone": "z1"}) for _ in range(10)])
    for flt in filters:  # the label columns made above now cover the new entries
        check(flt)
    store.remove("g", np.arange(1, 41, 3))
    for i in range(1, 41, 3):
        del entries[i]
    store.snapshot("g")  # compacts the flat gallery's rows and their columns
    for flt in filters:
        check(flt)
    store.close()
    store = FaissGalleryStore(tmp_path)
    for flt in filters:
        check(flt)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
@pytest.mark.parametrize("n_queries", [1, 9])  # FAISS's scan with a bitmap, or BLAS
@pytest.mark.parametrize("share", [0.1, 0.9])  # BLAS over a copy of the allowed rows, or block by block over all
def test_exact_scans_equal_brute_force(tmp_path, monkeypatch, index_type, n_queries, share):
    monkeypatch.setattr("retrieval.gallery.faiss_store.EXACT_BLOCK", 7)  # many blocks, merged
    rng = np.random.default_rng(int(share * 10) + n_queries)
    vecs = rng.normal(size=(60, 8)).astype(np.float32)
    chosen = rng.random(60) < share
    meta = [EntryMetadata(labels={"in": "y" if c else "n"}) for c in chosen]
    store = FaissGalleryStore(tmp_path)
    store.create("g", 8, index_type)
    store.add("g", np.arange(1, 61), vecs, meta)
    store.remove("g", np.array([int(np.flatnonzero(chosen)[0]) + 1]))  # a dead row among the allowed ones
    chosen[np.flatnonzero(chosen)[0]] = False
    queries = rng.normal(size=(n_queries, 8)).astype(np.float32)
    sims = l2_normalize(queries) @ l2_normalize(vecs).T
    for k in (3, 60):
        for q, row in enumerate(store.search("g", queries, k, [SearchFilter(labels={"in": "y"})])):
            allowed = np.flatnonzero(chosen)
            best = allowed[np.argsort(-sims[q, allowed], kind="stable")][:k]
            assert [h.id for h in row] == (best + 1).tolist()
            np.testing.assert_allclose([h.score for h in row], sims[q, best], atol=1e-5)


@pytest.mark.parametrize("overfetch", [0, 1024])  # a scan of the live rows, or k + dead fetched and the dead dropped
def test_flat_search_after_removals_equals_brute_force(tmp_path, monkeypatch, overfetch):
    monkeypatch.setattr("retrieval.gallery.faiss_store.OVERFETCH_DEAD", overfetch)
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(80, 8)).astype(np.float32)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 8)
    store.add("g", np.arange(1, 81), vecs, [EntryMetadata()] * 80)
    store.add("g", np.array([2]), -vecs[1:2], [EntryMetadata()], replace=True)  # its old row is dead
    vecs[1] = -vecs[1]
    store.remove("g", np.arange(10, 30))
    live = np.setdiff1d(np.arange(80), np.arange(9, 29))
    queries = rng.normal(size=(9, 8)).astype(np.float32)
    sims = l2_normalize(queries) @ l2_normalize(vecs).T
    for q, row in enumerate(store.search("g", queries, 12, [])):
        best = live[np.argsort(-sims[q, live], kind="stable")][:12]
        assert [h.id for h in row] == (best + 1).tolist()


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_a_search_in_parts_answers_as_one_and_stops_between_parts_once_its_caller_has_gone(tmp_path, monkeypatch,
                                                                                           index_type):
    """A call's queries are searched in parts of bounded work, so that a caller who gave up on
    4,096 queries over a million entries does not hold the gallery thread for the rest."""
    import threading

    from retrieval.cancellation import Cancelled, run_cancellable
    from retrieval.gallery import faiss_store

    vecs, meta = _data(300)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, index_type)
    store.add("g", np.arange(1, 301), vecs, meta)
    store.remove("g", np.array([5]))
    queries = np.random.default_rng(2).normal(size=(23, 16)).astype(np.float32)
    filters = [SearchFilter(exclude_camera_id="c1") if i % 3 else SearchFilter() for i in range(23)]
    whole = store.search("g", queries, 10, filters)
    monkeypatch.setattr(faiss_store, "SEARCH_PART_WORK", 300 * 4)  # 4 queries a part: 15 with a filter -> 4 parts
    monkeypatch.setattr(faiss_store, "SEARCH_PART_QUERIES", 1)
    parts, ended = [], threading.Event()
    real = faiss_store._Gallery._search_part

    def counted(self, *args):
        parts.append(len(args[0]))
        return real(self, *args)

    monkeypatch.setattr(faiss_store._Gallery, "_search_part", counted)
    split = run_cancellable(ended, store.search, "g", queries, 10, filters)
    assert sorted(parts) == [3, 4, 4, 4, 4, 4]  # 8 queries in 2 parts, 15 in 4 (4, 4, 4, 3)
    assert [[h.id for h in row] for row in split] == [[h.id for h in row] for row in whole]
    np.testing.assert_allclose([h.score for row in split for h in row], [h.score for row in whole for h in row],
                               atol=1e-6)  # BLAS rounds the last bit by the shape of its product

    def stop_after_one(self, *args):
        ended.set()  # the caller goes while the first part runs
        return counted(self, *args)

    parts.clear()
    monkeypatch.setattr(faiss_store._Gallery, "_search_part", stop_after_one)
    with pytest.raises(Cancelled):
        run_cancellable(ended, store.search, "g", queries, 10, filters)
    assert len(parts) == 1
    store.close()


def test_galleries_keep_the_model_they_were_made_for(store, tmp_path):
    store.create("g", 16, "hnsw", model="abc123")
    store.create("legacy", 16)
    assert (store.info("g").model, store.model("g"), store.info("legacy").model) == ("abc123", "abc123", "")
    # read back, not remembered: a Milvus HNSW gallery used to read as flat (its schema description came back empty)
    assert [(i.name, i.index_type) for i in store.list()] == [("g", "hnsw"), ("legacy", "flat")]
    assert store.models() == {"g": "abc123", "legacy": ""}
    with pytest.raises(GalleryNotFound):
        store.model("nope")
    if isinstance(store, FaissGalleryStore):
        store.close()
        assert FaissGalleryStore(tmp_path / "faiss").models() == {"g": "abc123", "legacy": ""}


def test_remove_and_info(store):
    vecs, meta = _data(30)
    store.create("g", 16)
    store.add("g", np.arange(1, 31), vecs, meta)
    assert store.remove("g", np.array([2, 3, 99])) == (2, [99])
    assert store.info("g").size == 28 and [i.name for i in store.list()] == ["g"]
    assert all(h.id not in (2, 3) for h in store.search("g", vecs[:3], 30, [])[0])
    store.drop("g")
    assert store.list() == []
    with pytest.raises(GalleryNotFound):
        store.info("g")


def test_remove_people_removes_every_entry_of_theirs(store):
    vecs, meta = _data(60)  # person ids "0".."19", three entries each
    meta[5] = EntryMetadata(camera_id="c1")  # one entry without a person id
    store.create("g", 16)
    store.add("g", np.arange(1, 61), vecs, meta)
    assert store.remove_people("g", ["3", "nobody", "7", "3"]) == (6, ["nobody"])
    assert store.info("g").size == 54
    hits = store.search("g", vecs, 60, [])
    assert all(h.metadata.person_id not in ("3", "7") for row in hits for h in row)
    assert {h.metadata.person_id for row in hits for h in row} == {str(i) for i in range(20)} - {"3", "7"} | {""}
    assert store.remove_people("g", ["3"]) == (0, ["3"])
    odd = ['O"Brien', "entrée", "back\\slash"]  # what would end or break a Milvus string literal
    store.add("g", np.arange(100, 103), vecs[:3], [EntryMetadata(person_id=p) for p in odd])
    assert store.remove_people("g", odd) == (3, [])
    with pytest.raises(InvalidEntry, match="must not be empty"):  # "" would mean every entry without a person id
        store.remove_people("g", [""])
    assert store.info("g").size == 54
    with pytest.raises(GalleryNotFound):
        store.remove_people("nope", ["1"])


def test_remove_before_removes_entries_older_than_a_time(store):
    vecs, meta = _data(40)  # timestamps 0..39; 0 means "not recorded"
    store.create("g", 16)
    store.add("g", np.arange(1, 41), vecs, meta)
    assert store.remove_before("g", 10.5) == 10  # timestamps 1..10; the entry without one stays
    left = {h.metadata.timestamp for h in store.search("g", vecs[:1], 40, [])[0]}
    assert left == {0.0, *map(float, range(11, 40))}
    assert store.remove_before("g", 5) == 0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidEntry, match="before_timestamp must be a time above 0"):
            store.remove_before("g", bad)
    with pytest.raises(GalleryNotFound):
        store.remove_before("nope", 5)


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_entries_page_through_the_gallery_by_id(store, index_type):
    vecs, meta = _data(90)
    store.create("g", 16, index_type)
    ids = np.random.default_rng(3).permutation(np.arange(1, 91) * 7)  # added out of id order, in three calls
    for part in np.array_split(np.arange(90), 3):
        store.add("g", ids[part], vecs[part], [meta[i] for i in part])
    store.remove("g", ids[:4])
    listed, after, pages = [], 0, 0
    while True:
        page = store.entries("g", after, 25, with_vectors=True)
        assert page.ids.tolist() == sorted(page.ids.tolist()) and page.vectors.shape == (len(page.ids), 16)
        listed += list(zip(page.ids.tolist(), page.metadata, page.vectors))
        pages += 1
        if not page.more:
            break
        after = int(page.ids[-1])
    assert pages == 4 and [i for i, _, _ in listed] == sorted(ids[4:].tolist())
    position = {int(i): n for n, i in enumerate(ids)}
    for entry_id, m, v in listed:
        assert m == meta[position[entry_id]]
        np.testing.assert_allclose(v, l2_normalize(vecs[position[entry_id]][None])[0], atol=1e-6)
    assert store.entries("g", int(ids.max())).ids.tolist() == []


def test_a_listing_lists_each_entry_present_throughout_exactly_once(store):
    """Entries added and removed between pages, on both sides of the cursor, neither repeat nor
    hide the others (an offset-based listing would skip one entry per removal behind it)."""
    vecs, meta = _data(60)
    store.create("g", 16)
    store.add("g", np.arange(1, 61) * 2, vecs, meta)  # ids 2, 4, ..., 120
    listed, after, gone_early, touched = [], 0, set(), set()
    while True:
        page = store.entries("g", after, 10)
        listed += page.ids.tolist()
        if not page.more:
            break
        after = int(page.ids[-1])
        behind, ahead = after, after + 2  # one listed already, one not yet
        store.remove("g", np.array([behind, ahead]))
        gone_early.add(ahead)
        store.add("g", np.array([after - 1, after + 3]), vecs[:2], meta[:2])  # new ids below and above the cursor
        touched |= {behind, ahead, after - 1, after + 3}
    assert len(listed) == len(set(listed))
    assert set(range(2, 121, 2)) - touched <= set(listed)
    assert not gone_early & set(listed)


def test_get_returns_the_entries_held_in_the_order_asked(store):
    vecs, meta = _data(10)
    store.create("g", 16)
    store.add("g", np.arange(1, 11), vecs, meta)
    page = store.get("g", np.array([7, 99, 2]))
    assert page.ids.tolist() == [7, 2] and [m.timestamp for m in page.metadata] == [6.0, 1.0]
    np.testing.assert_allclose(page.vectors, l2_normalize(vecs[[6, 1]]), atol=1e-6)
    gone = store.get("g", np.array([98, 99]))  # none held: on Milvus the empty answer failed to take its shape
    assert gone.ids.tolist() == [] and gone.vectors.shape == (0, 16)
    with pytest.raises(GalleryNotFound):
        store.get("nope", np.array([1]))


@pytest.fixture
def milvus_with_30(tmp_path, monkeypatch):
    """A Milvus Lite store holding gallery "g" of ``_data(30)``, and ``record(method, key)``: from
    then on, the length of argument ``key`` of each call of the client's ``method``."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    vecs, meta = _data(30)
    store = open_milvus_store(tmp_path)
    store.create("g", 16)
    store.add("g", np.arange(1, 31), vecs, meta)

    def record(method: str, key: str) -> list[int]:
        calls, real = [], getattr(store.client, method)
        monkeypatch.setattr(store.client, method, lambda *a, **k: calls.append(len(k[key])) or real(*a, **k))
        return calls

    yield store, vecs, record
    close_milvus_store(store)


def test_milvus_fetches_many_entries_in_calls_of_bounded_size(milvus_with_30, monkeypatch):
    """A re-ranked search of 64 queries fetches about 130,000 entries (275 MB at 512-d): one get
    was over a Milvus server's 64 MiB answer limit and its 16,384-row result limit."""
    import retrieval.gallery.milvus_store as milvus_store

    store, _, record = milvus_with_30
    asked = np.array([7, 99, 2, 10, 1, 5, 98, 3])
    whole = store.get("g", asked)
    monkeypatch.setattr(milvus_store, "FETCH_BYTES", 3 * (4 * 16 + 256))  # 3 ids a call
    calls = record("get", "ids")
    parts = store.get("g", asked)
    assert calls == [3, 3, 2]
    assert parts.ids.tolist() == whole.ids.tolist() == [7, 2, 10, 1, 5, 3]
    np.testing.assert_array_equal(parts.vectors, whole.vectors)
    assert parts.metadata == whole.metadata


def test_milvus_finds_clashing_ids_beyond_one_calls_rows(milvus_with_30, monkeypatch):
    """The check before an add read every id in one get; a Milvus server answers at most 16,384
    rows, so clashes beyond them went unseen and older servers kept both rows under one id."""
    import retrieval.gallery.milvus_store as milvus_store

    store, vecs, record = milvus_with_30
    monkeypatch.setattr(milvus_store, "MAX_LIMIT", 4)
    calls = record("get", "ids")
    with pytest.raises(GalleryExists) as err:
        store.add("g", np.arange(21, 41), np.ones((20, 16), np.float32), [EntryMetadata()] * 20)
    assert calls == [4, 4, 4, 4, 4] and str(list(range(21, 31))) in str(err.value)
    assert store.info("g").size == 30


def test_milvus_searches_many_queries_in_calls_of_bounded_size(milvus_with_30, monkeypatch):
    """The neighbour search of a re-ranked search sends thousands of queries at once."""
    import retrieval.gallery.milvus_store as milvus_store

    store, vecs, record = milvus_with_30
    flts = [SearchFilter(exclude_camera_id="c1") if i % 2 else SearchFilter() for i in range(7)]
    whole = store.search("g", vecs[:7], 4, flts)
    monkeypatch.setattr(milvus_store, "SEARCH_HITS", 8)  # 2 queries of 4 hits a call
    calls = record("search", "data")
    parts = store.search("g", vecs[:7], 4, flts)
    assert sorted(calls) == [1, 2, 2, 2]  # 4 queries without a filter (2 + 2), 3 with one (2 + 1)
    assert [[(h.id, round(h.score, 5)) for h in row] for row in parts] == [[(h.id, round(h.score, 5)) for h in row] for row in whole]

    import threading

    from retrieval.cancellation import Cancelled, run_cancellable

    ended, real_search = threading.Event(), store.client.search
    calls.clear()
    monkeypatch.setattr(store.client, "search", lambda *a, **k: ended.set() or real_search(*a, **k))  # the caller goes
    with pytest.raises(Cancelled):
        run_cancellable(ended, store.search, "g", vecs[:7], 4, flts)
    assert len(calls) == 1  # no call after the one that was running


def test_listing_milvus_lite_logs_no_warning(tmp_path):
    import logging

    import pymilvus  # noqa: F401 - first: its import configures logging afresh, dropping handlers of loggers under it

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    watched = logging.getLogger("pymilvus.client.iterator.query_iterator")
    watched.addHandler(handler)
    store = open_milvus_store(tmp_path)
    try:
        store.create("g", 4)
        store.add("g", np.array([1]), np.ones((1, 4)), [EntryMetadata()])
        assert store.entries("g").ids.tolist() == [1]
    finally:
        watched.removeHandler(handler)
        close_milvus_store(store)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []


def test_entries_of_some_people(store):
    vecs, meta = _data(60)  # person ids "0".."19", three entries each
    store.create("g", 16)
    store.add("g", np.arange(1, 61), vecs, meta)
    page = store.entries("g", person_ids=["3", "nobody", "17"])
    assert page.ids.tolist() == [4, 18, 24, 38, 44, 58] and not page.more and page.vectors is None
    assert [m.person_id for m in page.metadata] == ["3", "17"] * 3
    first = store.entries("g", 0, 2, ["3", "17"])
    assert first.ids.tolist() == [4, 18] and first.more
    assert store.entries("g", 18, 10, ["3", "17"]).ids.tolist() == [24, 38, 44, 58]
    kept = store.entries("g", 0, 1000, ["3", "17"], flt=SearchFilter(time_from=20, time_to=50, labels={"site": "a"}))
    assert kept.ids.tolist() == [24, 38, 44]  # timestamps 23, 37 and 43 (ids are one above): odd, so site "a"
    assert store.entries("g", 0, 1000, ["3", "17"], flt=SearchFilter(time_from=20, time_to=50, labels={"site": "b"})).ids.size == 0
    smallest = store.entries("g", flt=SearchFilter(time_from=math.ulp(0.0), time_to=math.nextafter(3.0, 0.0)))
    assert smallest.ids.tolist() == [2, 3]  # timestamps 1 and 2: set, and below 3
    assert store.entries("g", flt=SearchFilter(exclude_camera_id="c0", labels={"nobody": "x"})).ids.tolist() == []
    for bad, match in [(dict(limit=0), "page size"), (dict(limit=10_001), "page size"), (dict(after_id=-1), "after_id"),
                       (dict(person_ids=[""]), "must not be empty"),
                       (dict(flt=SearchFilter(time_from=5, time_to=4)), "filter: time_from 5 is after time_to 4"),
                       (dict(flt=SearchFilter(time_to=float("nan"))), "must be finite")]:
        with pytest.raises(InvalidEntry, match=match):
            store.entries("g", **bad)
    with pytest.raises(GalleryNotFound):
        store.entries("nope")


def test_removed_people_stay_removed_after_a_restart(tmp_path):
    vecs, meta = _data(40)
    store = FaissGalleryStore(tmp_path / "g")
    store.create("g", 16)
    store.add("g", np.arange(1, 41), vecs, meta)
    store.snapshot("g")
    assert store.remove_people("g", ["4"]) == (2, [])  # logged after the snapshot
    store.settle()
    reopened = FaissGalleryStore(tmp_path / "g")  # as after a crash: the log is replayed
    assert reopened.info("g").size == 38
    assert all(h.metadata.person_id != "4" for h in reopened.search("g", vecs[:10], 40, [])[0])
    reopened.close()


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_removed_people_leave_the_disk_too(tmp_path, index_type):
    """A request to forget someone: their vectors were still in the log that added them, and in an
    HNSW gallery's saved rows and graph (compacted only once a large share of rows is dead)."""
    vecs, meta = _data(200)
    store = FaissGalleryStore(tmp_path / "g")
    store.create("g", 16, index_type)
    store.add("g", np.arange(1, 201), vecs, meta)
    store.snapshot("g")  # the rows and (HNSW) the graph on disk
    store.add("g", np.arange(201, 211), vecs[:10] + 1, meta[:10])  # and some in the log only
    gone = [i for i, m in enumerate(meta) if m.person_id == "3"] + [200 + i for i, m in enumerate(meta[:10]) if m.person_id == "3"]
    secret = l2_normalize(np.stack([vecs[i] if i < 200 else vecs[i - 200] + 1 for i in gone]))  # as stored

    def on_disk(vector: np.ndarray) -> bool:
        return any(vector.tobytes() in f.read_bytes() for f in (tmp_path / "g" / "g").iterdir() if f.is_file())

    assert all(on_disk(v) for v in secret)
    assert store.remove_people("g", ["3"]) == (len(gone), [])  # 10 of 200 rows: an HNSW gallery would keep them
    store.settle()  # the purge runs in the background, at once
    assert not any(on_disk(v) for v in secret)
    old = [i for i, m in enumerate(meta) if 0 < m.timestamp < 20 and m.person_id != "3"]
    old_extra = [j for j, m in enumerate(meta[:10]) if 0 < m.timestamp < 20 and m.person_id != "3"]  # ids 201..210
    assert store.remove_before("g", 20) == len(old) + len(old_extra)  # a retention period purges the same way
    store.settle()
    assert not any(on_disk(v) for v in l2_normalize(np.concatenate([vecs[old], vecs[old_extra] + 1])))
    gone += old + old_extra
    assert store.info("g").size == 210 - len(gone)
    kept = (tmp_path / "g" / "g" / "snapshot.npz").stat().st_mtime_ns
    assert store.remove("g", np.array([1])) == (1, [])  # an ordinary removal waits for the next snapshot, as before
    store.settle()
    assert (tmp_path / "g" / "g" / "snapshot.npz").stat().st_mtime_ns == kept
    store.close()
    reopened = FaissGalleryStore(tmp_path / "g")
    assert reopened.info("g").size == 209 - len(gone)
    assert all(h.metadata.person_id != "3" for h in reopened.search("g", vecs[:5], 50, [])[0])
    reopened.close()


def _clustered(seed: int, n: int, centres: int = 10, dim: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(4).normal(size=(centres, dim))
    return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, dim)) * 0.6).astype(np.float32)


@pytest.mark.parametrize("joint", [False, True])
def test_reranked_search_matches_offline_when_the_pool_covers_the_gallery(store, joint):
    """Each query alone equals offline re-ranking of that query; joint equals offline re-ranking
    of the whole query set (the evaluation protocol)."""
    gallery, queries = _clustered(5, 80), _clustered(6, 6)
    store.create("g", 16)
    ids = store.add("g", np.arange(1, 81), gallery, [EntryMetadata()] * 80)
    hits = store.search("g", queries, 80, [], RerankOptions(k1=8, k2=3, lambda_value=0.3, pool=80, joint=joint))
    q, g = l2_normalize(queries), l2_normalize(gallery)
    offline = (k_reciprocal_rerank(q, g, 8, 3, 0.3) if joint
               else np.concatenate([k_reciprocal_rerank(q[i:i + 1], g, 8, 3, 0.3) for i in range(len(q))]))
    for q, row in enumerate(hits):
        assert [h.id for h in row][:20] == ids[np.argsort(offline[q], kind="stable")[:20]].tolist()
        np.testing.assert_allclose([h.distance for h in row], np.sort(offline[q]), atol=1e-5)


def test_a_reranked_answer_does_not_depend_on_the_other_queries_of_the_call(store):
    """A tracker that searches one frame's people in one call must get, for each, what a call of
    its own would give: joint re-ranking made each query part of the others' neighbourhoods."""
    gallery, queries = _clustered(7, 300, centres=30), _clustered(8, 12, centres=30)
    store.create("g", 16)
    store.add("g", np.arange(1, 301), gallery, [EntryMetadata(camera_id=f"c{i % 2}") for i in range(300)])
    opts = RerankOptions(k1=10, k2=4, pool=40)
    flts = [SearchFilter(exclude_camera_id=f"c{i % 2}") for i in range(12)]
    together = store.search("g", queries, 10, flts, opts)
    alone = [store.search("g", queries[i:i + 1], 10, flts[i:i + 1], opts)[0] for i in range(12)]
    assert [[(h.id, round(h.distance, 5)) for h in row] for row in together] == \
        [[(h.id, round(h.distance, 5)) for h in row] for row in alone]
    joint = store.search("g", queries, 10, flts, RerankOptions(k1=10, k2=4, pool=40, joint=True))
    assert [[h.id for h in row] for row in joint] != [[h.id for h in row] for row in alone]  # what it guards against


def _people_data(seed=5):
    """300 entries: person "0" has 150 (all near one centre), 19 others 6 each, 36 have no person id."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, 16))
    owner = np.concatenate([np.zeros(150, int), np.repeat(np.arange(1, 20), 6), np.full(36, -1)])
    vecs = (centres[np.maximum(owner, 0)] * (owner >= 0)[:, None] + rng.normal(size=(300, 16)) * 0.5).astype(np.float32)
    meta = [EntryMetadata(person_id="" if o < 0 else str(o), camera_id=f"c{i % 3}") for i, o in enumerate(owner)]
    return vecs, meta, centres


def _grouped_brute_force(query, vecs, meta, ids, top_k, allowed=lambda m: True):
    sims = l2_normalize(query[None]) @ l2_normalize(vecs).T
    out, seen = [], set()
    for j in np.argsort(-sims[0], kind="stable"):
        key = meta[j].person_id or f"entry {ids[j]}"
        if allowed(meta[j]) and key not in seen:
            seen.add(key)
            out.append(int(ids[j]))
    return out[:top_k]


def test_search_by_person_returns_each_persons_best_entry(store):
    vecs, meta, centres = _people_data()
    store.create("g", 16)
    ids = store.add("g", np.arange(1, 301), vecs, meta)
    queries = np.stack([centres[0], centres[3], vecs[200]]).astype(np.float32)  # near the crowded person, another, a loner
    plain = store.search("g", queries[:1], 8, [])
    assert {h.metadata.person_id for h in plain[0]} == {"0"}  # the crowded person fills a plain answer
    grouped = store.search("g", queries, 8, [], group_by_person=True)
    for q, row in enumerate(grouped):
        assert [h.id for h in row] == _grouped_brute_force(queries[q], vecs, meta, ids, 8)
        people = [h.metadata.person_id for h in row if h.metadata.person_id]
        assert len(people) == len(set(people))
    assert grouped[0][0].metadata.person_id == "0" and grouped[0][0].id == plain[0][0].id
    flt = SearchFilter(exclude_camera_id="c1")
    filtered = store.search("g", queries, 5, [flt], group_by_person=True)
    for q, row in enumerate(filtered):
        assert [h.id for h in row] == _grouped_brute_force(queries[q], vecs, meta, ids, 5, lambda m: m.camera_id != "c1")
    everyone = store.search("g", queries[:1], 1000, [], group_by_person=True)  # more people asked for than there are
    assert len(everyone[0]) == 19 + 1 + 36 == len({h.metadata.person_id or h.id for h in everyone[0]})

    reranked = store.search("g", queries, 6, [], RerankOptions(k1=6, k2=3, pool=60), group_by_person=True)
    pooled = store.search("g", queries, 60, [], RerankOptions(k1=6, k2=3, pool=60))
    for row, pool in zip(reranked, pooled):
        expected, seen = [], set()
        for h in pool:  # the re-ranked pool's order, each person's first entry
            key = h.metadata.person_id or h.id
            if key not in seen:
                seen.add(key)
                expected.append(h.id)
        assert [h.id for h in row] == expected[:6]


def test_search_by_person_in_a_gallery_of_one_entry_finds_it(store):
    """The smallest gallery there is: a search by person asks for min(entries, 4 x top_k) hits, 1."""
    store.create("g", 4)
    store.add("g", np.array([7]), np.eye(1, 4), [EntryMetadata(person_id="solo")])
    assert [[h.id for h in row] for row in store.search("g", np.eye(2, 4), 3, [], group_by_person=True)] == [[7], [7]]


def test_search_by_person_widens_until_it_has_enough_people():
    from retrieval.gallery import Hit
    from retrieval.gallery.grouping import search_by_person

    entries = [Hit(i, 1.0 - i / 100, i / 100, EntryMetadata(person_id=str(0 if i < 50 else i))) for i in range(60)]
    asked = []

    def search(rows, k):
        asked.append((list(rows), k))
        return [entries[:k] for _ in rows]

    out = search_by_person(search, 2, 3, cap=60)
    assert [[h.id for h in row] for row in out] == [[0, 50, 51]] * 2
    assert asked == [([0, 1], 12), ([0, 1], 48), ([0, 1], 60)]  # 4x wider each round, up to the cap
    asked.clear()
    assert [h.id for h in search_by_person(search, 1, 20, cap=60)[0]] == [0, *range(50, 60)]  # fewer people than asked
    assert asked == [([0], 60)]


def test_search_by_person_holds_a_bounded_number_of_hits_per_search(monkeypatch):
    """Queries short of people go in groups, so that a wide round over many queries does not
    hold every query's hits at once."""
    import retrieval.gallery.grouping as grouping
    from retrieval.gallery import Hit

    entries = [Hit(i, 1.0 - i / 100, i / 100, EntryMetadata(person_id=str(0 if i < 50 else i))) for i in range(60)]
    asked = []

    def search(rows, k):
        asked.append((list(rows), k))
        return [entries[:k] for _ in rows]

    monkeypatch.setattr(grouping, "ROUND_HITS", 100)
    out = grouping.search_by_person(search, 5, 3, cap=60)
    assert [[h.id for h in row] for row in out] == [[0, 50, 51]] * 5
    assert max(len(rows) * k for rows, k in asked) <= 100
    assert asked[:2] == [([0, 1, 2, 3, 4], 12), ([0, 1], 48)] and sorted(sum((r for r, _ in asked[1:4]), [])) == [0, 1, 2, 3, 4]


def test_reranked_search_whose_filter_leaves_nothing_answers_no_hits(store):
    """Milvus failed it with a numpy reshape error (INTERNAL)."""
    store.create("g", 4)
    store.add("g", np.arange(1, 6), np.random.default_rng(0).normal(size=(5, 4)), [EntryMetadata(camera_id="c1")] * 5)
    hits = store.search("g", np.ones((2, 4)), 3, [SearchFilter(exclude_camera_id="c1")], RerankOptions(k1=2, k2=1))
    assert hits == [[], []]


def test_milvus_reranked_search_goes_on_without_an_entry_another_replica_removed(tmp_path, monkeypatch):
    """Replicas share a Milvus gallery without sharing a lock: an entry found by the pool search can
    be gone when its vector is fetched. The search used to fail with a KeyError (INTERNAL)."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from retrieval.gallery.milvus_store import _collection

    rng = np.random.default_rng(4)
    gallery = rng.normal(size=(40, 16)).astype(np.float32)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    store = open_milvus_store(tmp_path)
    try:
        store.create("g", 16)
        ids = store.add("g", np.arange(1, 41), gallery, [EntryMetadata()] * 40)
        pool_search, removed = store._search, []

        def search_then_another_replica_removes(*args):
            scores, found, meta = pool_search(*args)
            if not removed:
                removed.append(int(found[0, 0]))
                store.client.delete(_collection("g"), ids=removed)
                store.client.flush(_collection("g"))
            return scores, found, meta

        monkeypatch.setattr(store, "_search", search_then_another_replica_removes)
        hits = store.search("g", queries, 40, [], RerankOptions(k1=5, k2=2, lambda_value=0.3, pool=40))
    finally:
        close_milvus_store(store)
    keep = ids != removed[0]
    q, g = l2_normalize(queries), l2_normalize(gallery[keep])
    for i, row in enumerate(hits):
        offline = k_reciprocal_rerank(q[i:i + 1], g, 5, 2, 0.3)[0]
        assert [h.id for h in row] == ids[keep][np.argsort(offline, kind="stable")].tolist()


def test_hnsw_recall_against_flat(store):
    vecs, meta = _data(3000, 32, seed=2)
    store.create("flat", 32)
    store.create("hnsw", 32, "hnsw")
    for name in ("flat", "hnsw"):
        store.add(name, np.arange(1, 3001), vecs, meta)
    queries = np.random.default_rng(5).normal(size=(50, 32)).astype(np.float32)
    exact = store.search("flat", queries, 10, [])
    approx = store.search("hnsw", queries, 10, [])
    recall = np.mean([len({h.id for h in a} & {h.id for h in e}) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9


def test_hnsw_snapshots_rebuild_the_graph_only_when_many_rows_are_dead(tmp_path, caplog):
    """Every snapshot rebuilt the HNSW graph under the gallery's lock (13.5 s for 30,000 512-d
    entries here), stopping every search, even for a handful of removals."""
    import logging

    vecs, meta = _data(100, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, "hnsw")
    store.add("g", np.arange(1, 101), vecs, meta)
    gallery = store.galleries["g"]
    graph = gallery.index
    store.remove("g", np.arange(1, 11))  # 10 % dead
    store.snapshot("g")
    assert gallery.index is graph and len(gallery.ids) == 100  # kept, dead rows filtered
    hits = store.search("g", vecs[:5], 5, [])
    assert all(h.id > 10 for r in hits for h in r)
    with caplog.at_level(logging.INFO):
        reopened = FaissGalleryStore(tmp_path)  # the snapshot keeps the dead rows beside the graph holding them
    assert len(reopened.galleries["g"].ids) == 100 and reopened.info("g").size == 90
    assert "read its HNSW graph over 100 rows" in caplog.text and "built its HNSW index" not in caplog.text
    assert [[h.id for h in r] for r in reopened.search("g", vecs[:5], 5, [])] == [[h.id for h in r] for r in hits]
    store.remove("g", np.arange(11, 31))  # 30 % dead: now worth a rebuild
    store.snapshot("g")
    assert gallery.index is not graph and len(gallery.ids) == 70


def _held(owner, method: str, skip: int = 0):
    """Make ``owner.<method>`` wait for the returned event from its ``skip``+1-th call on: a
    snapshot or an add paused at that step."""
    import threading

    go, reached, original, calls = threading.Event(), threading.Event(), getattr(owner, method), []

    def paused(*args):
        calls.append(1)
        if len(calls) > skip:
            reached.set()
            assert go.wait(10), "the test never let it go on"
        return original(*args)

    setattr(owner, method, paused)
    return reached, go


@pytest.mark.parametrize("index_type, dead", [("flat", 0), ("flat", 5), ("hnsw", 5), ("hnsw", 40)])
def test_searches_and_changes_go_on_while_a_snapshot_writes(tmp_path, monkeypatch, index_type, dead):
    """A snapshot held the gallery's write lock while it wrote every row: 8 s for a million flat
    entries, every 50,000 changes, during which every search of that gallery waited. Each kind
    of snapshot: plain flat, compacting flat, HNSW keeping its dead rows, HNSW rebuilding its graph."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr("retrieval.gallery.faiss_snapshot.SNAPSHOT_CHUNK", 7)  # rows read and written in many chunks
    monkeypatch.setattr("retrieval.gallery.faiss_snapshot.CATCH_UP_UNDER_LOCK", 1)  # a compaction catches up in rounds
    vecs, meta = _data(100, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, index_type)
    store.add("g", np.arange(1, 101), vecs, meta)
    store.remove("g", np.arange(1, dead + 1))
    gallery = store.galleries["g"]
    compacts = dead and (index_type == "flat" or dead > 20)
    reached, go = _held(gallery, "_build" if compacts else "_write_rows")
    with ThreadPoolExecutor(1) as pool:
        snapshot = pool.submit(store.snapshot, "g")
        assert reached.wait(10)
        # while it is paused: a search, an add, a replacement and a removal all complete
        assert store.search("g", vecs[50:51], 1, [])[0][0].id == 51
        store.add("g", np.arange(101, 104), -vecs[:3], meta[:3])
        store.add("g", np.array([60]), -vecs[59:60], meta[59:60], replace=True)
        store.remove("g", np.array([70, 101]))
        assert not snapshot.done()
        go.set()
        snapshot.result(timeout=30)
    live = sorted(set(range(dead + 1, 104)) - {70, 101})
    expected = {i: (-vecs[i - 101] if i > 100 else -vecs[59] if i == 60 else vecs[i - 1]) for i in live}
    queries = l2_normalize(np.stack([expected[i] for i in (60, 102, 90)]))

    def check(s):
        assert s.info("g").size == len(live)
        rows = s.search("g", queries, len(live), [SearchFilter(time_from=-1.0)])  # an exact scan of everything
        for q, row in zip(queries, rows):
            assert sorted(h.id for h in row) == live
            for h in row:
                assert h.score == pytest.approx(float(l2_normalize(expected[h.id][None])[0] @ q), abs=1e-5)
        assert [r[0].id for r in s.search("g", queries, 1, [])] == [60, 102, 90]

    check(store)
    if compacts:
        assert len(gallery.ids) == len(live) + 3  # compacted, plus the rows added meanwhile; dead: 60's old row, 70, 101
    # what landed: the snapshot as frozen, the changes made meanwhile in the new log
    with np.load(tmp_path / "g" / "snapshot.npz") as data:
        assert sorted(data["ids"][data["alive"]] if "alive" in data.files else data["ids"]) == list(range(dead + 1, 101))
    assert (tmp_path / "g" / "wal.log").stat().st_size > 0 and not list((tmp_path / "g").glob("wal-*.log"))
    check(FaissGalleryStore(tmp_path))  # no close(): a crash; snapshot + the new log
    store.close()
    check(FaissGalleryStore(tmp_path))


def test_searches_go_on_while_an_add_is_logged_and_between_the_parts_of_a_large_hnsw_add(tmp_path, monkeypatch):
    """An add held the write lock while it logged (an fsync) and while the graph took every entry,
    0.2-0.5 ms each on 2 cores: one add of 20,000 entries kept the gallery's searches out for seconds."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr("retrieval.gallery.faiss_store.HNSW_ADD_CHUNK", 10)
    vecs, meta = _data(60, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, "hnsw")
    store.add("g", np.arange(1, 21), vecs[:20], meta[:20])
    gallery = store.galleries["g"]

    def top(i):
        return store.search("g", vecs[i - 1 : i], 1, [])[0][0].id

    with ThreadPoolExecutor(1) as pool:
        reached, go = _held(gallery.wal, "append")
        adding = pool.submit(store.add, "g", np.arange(21, 31), vecs[20:30], meta[20:30])
        assert reached.wait(10)
        assert top(5) == 5 and top(25) != 25 and not adding.done()  # logging: nothing applied yet
        go.set()
        adding.result(timeout=10)
        reached, go = _held(gallery.lock, "write", skip=1)  # before it takes the lock for its second part
        adding = pool.submit(store.add, "g", np.arange(31, 61), vecs[30:], meta[30:])  # three parts of 10
        assert reached.wait(10)
        assert top(35) == 35 and top(45) != 45 and not adding.done()  # the first part only
        go.set()
        adding.result(timeout=10)
    assert [top(i) for i in (25, 45, 60)] == [25, 45, 60] and store.info("g").size == 60
    assert FaissGalleryStore(tmp_path).info("g").size == 60  # the log holds each add whole


def test_the_change_that_triggers_a_snapshot_does_not_wait_for_it(tmp_path):
    store = FaissGalleryStore(tmp_path, snapshot_every=10)
    store.create("g", 16)
    vecs, meta = _data(30, 16)
    store.add("g", np.arange(1, 6), vecs[:5], meta[:5])
    reached, go = _held(store.galleries["g"], "_write_rows")
    store.add("g", np.arange(6, 16), vecs[5:15], meta[5:15])  # the 10th change: a snapshot starts
    assert reached.wait(10)
    store.add("g", np.arange(16, 31), vecs[15:], meta[15:])  # 15 more while it writes: no second one at once
    assert store.info("g").size == 30
    go.set()
    store.settle()  # then a second, for those 15: they need no further change to start it
    with np.load(tmp_path / "g" / "snapshot.npz") as data:
        assert data["ids"].tolist() == list(range(1, 31))
    assert not (tmp_path / "g" / "wal.log").exists() and not list((tmp_path / "g").glob("wal-*.log"))
    store.close()
    assert FaissGalleryStore(tmp_path).info("g").size == 30


def test_a_change_succeeds_when_no_thread_can_be_started_for_its_snapshot(tmp_path, monkeypatch, caplog):
    import threading

    store = FaissGalleryStore(tmp_path, snapshot_every=1)

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    store.create("g", 4)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    assert store.add("g", np.array([0]), np.ones((1, 4)), [EntryMetadata()]).tolist() == [1]
    assert "cannot start an automatic snapshot (can't start new thread)" in caplog.text
    monkeypatch.undo()
    store.add("g", np.array([0]), np.ones((1, 4)), [EntryMetadata()])  # this one starts it
    store.settle()
    assert (tmp_path / "g" / "snapshot.npz").exists() and store.info("g").size == 2


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_a_crash_at_any_step_of_a_snapshot_loses_nothing(tmp_path, monkeypatch, index_type):
    """A snapshot seals the log (wal.log becomes wal-<n>.log), writes, renames, then deletes the
    sealed segment. A crash before the rename: the old snapshot and the sealed segment are
    replayed; after it, before the deletion: the segment is the snapshot's, deleted at start."""
    import errno
    import os

    vecs, meta = _data(60, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, index_type)
    store.add("g", np.arange(1, 31), vecs[:30], meta[:30])
    store.snapshot("g")
    store.add("g", np.arange(31, 61), vecs[30:], meta[30:])
    store.remove("g", np.array([2, 40]))
    expected = [[h.id for h in r] for r in store.search("g", vecs[:8], 10, [])]
    real_replace = os.replace

    def crash_before_the_rename(src, dst):
        if str(dst).endswith("snapshot.npz"):
            raise KeyboardInterrupt("killed")  # not an OSError: the process dies here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        store.snapshot("g")
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "g").iterdir() if p.name.startswith("wal"))
    assert names == ["wal-00000002.log"]  # the sealed changes; no new ones yet
    reopened = FaissGalleryStore(tmp_path)
    assert reopened.info("g").size == 58
    assert [[h.id for h in r] for r in reopened.search("g", vecs[:8], 10, [])] == expected
    reopened.add("g", np.array([61]), vecs[:1] * -1, meta[:1])
    expected = [[h.id for h in r] for r in reopened.search("g", vecs[:8], 10, [])]

    kept = []
    monkeypatch.setattr("pathlib.Path.unlink", lambda self, missing_ok=False: kept.append(self.name))
    reopened.snapshot("g")  # lands, then "crashes" before deleting what it covers
    monkeypatch.undo()
    assert {"wal-00000002.log", "wal-00000003.log"} <= set(kept)

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.unlink", read_only)  # a start from a read-only mount: not deleted,
    assert FaissGalleryStore(tmp_path).info("g").size == 59  # not replayed, and the start goes on
    monkeypatch.undo()
    again = FaissGalleryStore(tmp_path)
    assert not list((tmp_path / "g").glob("wal-*.log"))  # covered by the snapshot: deleted, not replayed
    assert again.info("g").size == 59
    assert [[h.id for h in r] for r in again.search("g", vecs[:8], 10, [])] == expected


_ADD_UNTIL_KILLED = """
import sys
import numpy as np
from retrieval.gallery import EntryMetadata, FaissGalleryStore

root, index_type, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = FaissGalleryStore(root, snapshot_every=40)  # a snapshot every 8 adds: a kill often lands in one
if not store.list():
    store.create("g", 8, index_type)
print("ready", flush=True)
i = first
while True:
    ids = np.arange(i, i + 5)
    store.add("g", ids, np.stack([np.random.default_rng(j).normal(size=8) for j in ids]), [EntryMetadata()] * 5)
    sys.stdout.write(f"a {i}\\n")  # one write per line: a kill cannot split it
    sys.stdout.flush()
    if i % 3 == 0:  # enough removals that snapshots compact (HNSW: over 20 % dead)
        store.remove("g", np.array([i - 3, i - 1]))
        sys.stdout.write(f"r {i - 3} {i - 1}\\n")
        sys.stdout.flush()
    i += 5
"""


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_kill_9_during_automatic_snapshots_loses_nothing(tmp_path, index_type):
    """A process adding and removing, with automatic snapshots running in their own thread all the
    while, is killed at a random moment, three times over: every acknowledged change survives."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root, rng = Path(__file__).resolve().parents[1], np.random.default_rng(3)
    added, removed, first = set(), set(), 1
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _ADD_UNTIL_KILLED, str(tmp_path), index_type, str(first)],
                                 cwd=root, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.4, 1.2))
        child.kill()
        last_add, in_flight_removal = None, set()
        for line in child.stdout.read().split("\n")[:-1]:  # whole lines only
            kind, *ids = line.split()
            if kind == "a":
                last_add = int(ids[0])
                added.update(range(last_add, last_add + 5))
                # killed before the "r" line: this removal may or may not have happened
                in_flight_removal = {last_add - 3, last_add - 1} if last_add % 3 == 0 else set()
            else:
                removed.update(int(i) for i in ids)
                in_flight_removal = set()
        child.wait()
        child.stdout.close()
        store = FaissGalleryStore(tmp_path)
        gallery = store.galleries["g"]
        present = set(gallery.row)
        assert (added - removed) - present <= in_flight_removal, "acknowledged entries lost"
        assert not present & removed, "acknowledged removals undone"
        unacknowledged = present - added  # at most the one add in flight, whole
        assert unacknowledged in (set(), set(range(last_add + 5, last_add + 10))), sorted(unacknowledged)
        for i in present:
            np.testing.assert_allclose(gallery.vectors[gallery.row[i]],
                                       l2_normalize(np.random.default_rng(i).normal(size=(1, 8)))[0], atol=1e-6)
        added |= unacknowledged
        removed |= in_flight_removal - present
        first = max(added) + 100
        store.close()
    assert len(added) > 100


def test_a_drop_waits_for_the_snapshot_in_progress(tmp_path):
    """A snapshot writes without the gallery's lock: a drop meanwhile must neither fail it nor let it
    write into a new gallery of the same name."""
    import threading

    store = FaissGalleryStore(tmp_path)
    store.create("g", 16)
    vecs, meta = _data(10, 16)
    store.add("g", np.arange(1, 11), vecs, meta)
    reached, go = _held(store.galleries["g"], "_write_rows")
    snapshot = threading.Thread(target=store.snapshot, args=("g",))
    snapshot.start()
    assert reached.wait(10)
    dropping = threading.Thread(target=store.drop, args=("g",))
    dropping.start()
    dropping.join(0.3)
    assert dropping.is_alive() and store.search("g", vecs[:1], 1, [])[0][0].id == 1
    go.set()
    snapshot.join(10)
    dropping.join(10)
    assert not (tmp_path / "g").exists() and store.list() == []
    store.create("g", 8)
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["gallery.json"]


def _hnsw_answers(store, vecs):
    """Unfiltered, filtered and re-ranked searches, as comparable lists."""
    queries = np.concatenate([vecs[:6], -vecs[20:21]])
    return [[[(h.id, round(h.score, 5)) for h in row] for row in store.search("g", queries, 15, flt, rerank)]
            for flt, rerank in (([], None), ([SearchFilter(exclude_camera_id="c1")], None), ([SearchFilter(labels={"site": "a"})], None),
                                ([], RerankOptions(k1=6, k2=2, pool=40)))]


@pytest.mark.parametrize("cutoff", [0, 40_000])  # the graph walk with a selector, and the exact scan
def test_an_hnsw_restart_reads_the_saved_graph_instead_of_rebuilding_it(tmp_path, monkeypatch, caplog, cutoff):
    """A restart rebuilt the graph: about 0.45 ms per entry here, 7 minutes at a million entries."""
    import logging

    monkeypatch.setattr("retrieval.gallery.faiss_store.EXACT_SEARCH_CUTOFF", cutoff)
    vecs, meta = _data(200, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, "hnsw")
    store.add("g", np.arange(1, 201), vecs, meta)
    store.add("g", np.arange(21, 26), -vecs[20:25], meta[20:25], replace=True)  # old rows stay in the graph
    store.remove("g", np.arange(100, 110))
    store.snapshot("g")
    store.add("g", np.arange(201, 211), vecs[:10] * 0.5 + 0.1, meta[:10])  # after the snapshot: in the log only
    store.remove("g", np.array([3, 150]))
    before = _hnsw_answers(store, vecs)
    assert not any(h[0] in (3, 150) or 100 <= h[0] < 110 for kind in before for row in kind for h in row)
    assert before[0][6][0] == (21, 1.0)  # a replaced entry answers with its new vector

    rebuilds = []
    monkeypatch.setattr("retrieval.gallery.faiss_store._Gallery._rebuild_index", lambda self: rebuilds.append(self))
    with caplog.at_level(logging.INFO):
        reopened = FaissGalleryStore(tmp_path)  # no close(): a crash, with changes in the log
    assert rebuilds == [] and "read its HNSW graph over 205 rows" in caplog.text
    assert reopened.info("g").size == 198
    # one copy of the vectors: the graph's (row-aligned with the ids), none beside it
    gallery = reopened.galleries["g"]
    assert gallery._vectors.n == 0 and len(gallery.vectors) == len(gallery.ids) == 215
    np.testing.assert_allclose(gallery.vectors[gallery.row[30]], l2_normalize(vecs[29:30])[0], atol=1e-6)
    assert _hnsw_answers(reopened, vecs) == before
    assert len(list((tmp_path / "g").glob("hnsw-*"))) == 1  # one graph on disk


@pytest.mark.parametrize("damage", ["missing", "garbage", "another gallery's"])
def test_an_unusable_saved_graph_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    import logging

    vecs, meta = _data(60, 16)
    store = FaissGalleryStore(tmp_path)
    for name, n in (("g", 60), ("other", 30)):
        store.create(name, 16, "hnsw")
        store.add(name, np.arange(1, n + 1), vecs[:n], meta[:n])
        store.snapshot(name)
    before = _hnsw_answers(store, vecs)
    store.close()
    (graph,) = (tmp_path / "g").glob("hnsw-*.faiss")
    if damage == "missing":
        graph.unlink()
    elif damage == "garbage":
        graph.write_bytes(b"not a graph" * 10)
    else:
        graph.write_bytes(next((tmp_path / "other").glob("hnsw-*.faiss")).read_bytes())
    with caplog.at_level(logging.INFO):
        reopened = FaissGalleryStore(tmp_path)
    assert f"its saved HNSW graph {graph.name} is unusable" in caplog.text
    assert "built its HNSW index over 60 entries" in caplog.text
    assert _hnsw_answers(reopened, vecs) == before


def test_a_failed_snapshot_leaves_the_previous_graph_and_a_failed_graph_write_only_costs_a_rebuild(tmp_path, monkeypatch, caplog):
    import logging
    import os

    from retrieval.gallery import StorageError

    vecs, meta = _data(80, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, "hnsw")
    store.add("g", np.arange(1, 41), vecs[:40], meta[:40])
    store.snapshot("g")
    (first,) = (tmp_path / "g").glob("hnsw-*.faiss")
    store.add("g", np.arange(41, 81), vecs[40:], meta[40:])
    real_replace = os.replace

    def no_snapshot(src, dst):
        if str(dst).endswith("snapshot.npz"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", no_snapshot)
    with pytest.raises(StorageError, match="No space left"):
        store.snapshot("g")
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in (tmp_path / "g").glob("hnsw-*")] == [first.name]  # the new graph went with its snapshot
    before = _hnsw_answers(store, vecs)
    with caplog.at_level(logging.INFO):
        reopened = FaissGalleryStore(tmp_path)  # the old snapshot and its graph, then the log
    assert "read its HNSW graph over 40 rows" in caplog.text and _hnsw_answers(reopened, vecs) == before

    gallery = reopened.galleries["g"]
    reopened.remove("g", np.array([5, 6]))  # dead rows, saved with the snapshot
    before = _hnsw_answers(reopened, vecs)
    monkeypatch.setattr(gallery.faiss, "write_index", lambda *a: (_ for _ in ()).throw(RuntimeError("write error")))
    with caplog.at_level(logging.INFO):
        reopened.snapshot("g")  # saved without a graph
    assert "cannot save its HNSW graph (write error)" in caplog.text and not list((tmp_path / "g").glob("hnsw-*"))
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = FaissGalleryStore(tmp_path)
    assert "built its HNSW index over 80 entries" in caplog.text and _hnsw_answers(again, vecs) == before
    assert again.galleries["g"]._vectors.n == 0  # built from the snapshot's copy, which is then let go
    again.add("g", np.array([81]), vecs[:1] + 0.5, [EntryMetadata()])
    again.snapshot("g")  # the rebuilt graph, dead rows included, is saved and read back whole
    before = _hnsw_answers(again, vecs)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        last = FaissGalleryStore(tmp_path)
    assert "read its HNSW graph over 81 rows" in caplog.text and "unusable" not in caplog.text
    assert _hnsw_answers(last, vecs) == before


@pytest.mark.parametrize("cutoff", [0, 40_000])  # the graph walk with a selector, and the exact scan
def test_a_replaced_hnsw_entry_answers_with_its_new_vector_only(tmp_path, monkeypatch, cutoff):
    """The HNSW graph keeps a replaced entry's old vector until a compaction, and labelled by entry
    id it still answered as that id: a search for the old image found the entry at score 1.0."""
    monkeypatch.setattr("retrieval.gallery.faiss_store.EXACT_SEARCH_CUTOFF", cutoff)
    vecs, meta = _data(50, 16)
    store = FaissGalleryStore(tmp_path)
    store.create("g", 16, "hnsw")
    store.add("g", np.arange(1, 51), vecs, meta)
    store.add("g", np.array([8]), -vecs[7:8], [EntryMetadata(person_id="new")], replace=True)
    assert all(h.id != 8 for h in store.search("g", vecs[7:8], 5, [])[0])
    top = store.search("g", -vecs[7:8], 1, [])[0][0]
    assert (top.id, top.metadata.person_id) == (8, "new") and top.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n_queries", [3, 9])  # FAISS's scan of the allowed rows, then one BLAS product
def test_hnsw_with_a_selective_filter_finds_every_matching_entry(store, n_queries):
    """The graph walk under a filter that excludes nearly every entry found 2 of 5 matching ones."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(5000, 64)).astype(np.float32)  # no neighbourhood structure: the hard case
    meta = [EntryMetadata(camera_id=f"c{i % 500}", labels={"site": "rare" if i % 1000 == 0 else "common"})
            for i in range(5000)]
    for name, index in (("flat", "flat"), ("hnsw", "hnsw")):
        store.create(name, 64, index)
        store.add(name, np.arange(1, 5001), vecs, meta)
    queries = rng.normal(size=(n_queries, 64)).astype(np.float32)
    for flt in (SearchFilter(labels={"site": "rare"}), SearchFilter(exclude_camera_id="c1")):
        exact = store.search("flat", queries, 10, [flt])
        approx = store.search("hnsw", queries, 10, [flt])
        assert [[h.id for h in r] for r in approx] == [[h.id for h in r] for r in exact]
    assert all(len(r) == 5 for r in store.search("hnsw", queries, 10, [SearchFilter(labels={"site": "rare"})]))


class _GpuFlatLikeFaiss:
    """What a FAISS GPU flat index offers a caller: add and search only, at most GPU_MAX_K neighbours.
    Real GPU indexes ignore an IDSelector in search parameters and raise on remove_ids; this one
    refuses both, so any use of them fails the test instead of silently returning filtered-out rows."""

    def __init__(self, index):
        self.index, self.searches = index, 0

    def add(self, x):
        self.index.add(x)

    def search(self, x, k, params=None):
        from retrieval.gallery.faiss_store import GPU_MAX_K

        assert params is None and k <= GPU_MAX_K, "a GPU index takes neither selectors nor k above GPU_MAX_K"
        self.searches += 1
        return self.index.search(x, k)


def test_faiss_gpu_copy_answers_unfiltered_searches_only_and_survives_removals(tmp_path, monkeypatch):
    import faiss

    copies = []

    def to_gpu(index):
        copies.append(_GpuFlatLikeFaiss(index))
        return copies[-1]

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpu)
    store = FaissGalleryStore(tmp_path, snapshot_every=10_000)
    store.create("g", 16)
    assert store.info("g").device == "cuda"
    vecs, meta = _data()
    ids = store.add("g", np.zeros(len(vecs), dtype=np.int64), vecs, meta)
    queries = np.random.default_rng(9).normal(size=(5, 16)).astype(np.float32)
    sims = l2_normalize(queries) @ l2_normalize(vecs).T

    def expect(q_sims, alive, k):
        order = [r for r in np.argsort(-q_sims, kind="stable") if alive[r]]
        return ids[order[:k]].tolist()

    alive = np.ones(len(vecs), dtype=bool)
    assert [[h.id for h in row] for row in store.search("g", queries, 10, [])] == [expect(s, alive, 10) for s in sims]
    assert copies[-1].searches == 1
    filtered = store.search("g", queries, 10, [SearchFilter(exclude_camera_id="c0")] * 5)  # on the CPU index
    assert copies[-1].searches == 1 and all(h.metadata.camera_id != "c0" for row in filtered for h in row)
    # Remove each query's best hits: the copy keeps them but must never return them.
    gone = np.unique([expect(s, alive, 3) for s in sims])
    assert store.remove("g", gone)[0] == len(gone)
    alive[np.isin(ids, gone)] = False
    assert [[h.id for h in row] for row in store.search("g", queries, 10, [])] == [expect(s, alive, 10) for s in sims]
    assert copies[-1].searches == 2
    # Replacing an entry is a removal and an add: the new vector is found where it now belongs.
    target = int(ids[alive][0])
    store.add("g", np.array([target]), queries[:1], meta[:1], replace=True)
    assert store.search("g", queries[:1], 1, [])[0][0].id == target
    # A snapshot rebuilds the copy without the dead rows; a restart rebuilds it from disk.
    store.snapshot("g")
    assert len(copies) == 2 and copies[-1].index.ntotal == store.info("g").size
    store.close()
    reopened = FaissGalleryStore(tmp_path)
    assert reopened.info("g").device == "cuda" and store.info("g").size == reopened.info("g").size
    assert reopened.search("g", queries[:1], 1, [])[0][0].id == target
    # k beyond what a GPU index returns goes to the CPU index.
    monkeypatch.setattr("retrieval.gallery.faiss_store.GPU_MAX_K", 20)
    before = copies[-1].searches
    hits = reopened.search("g", queries[:1], 30, [])[0]
    assert copies[-1].searches == before and len(hits) == 30 and hits[0].id == target
    reopened.close()


def test_milvus_searches_read_at_the_chosen_consistency_and_write_checks_at_strong(tmp_path):
    """Strong costs a Milvus server's time tick (about 400 ms a search); the level a deployment picks
    must reach every search-path read, while the reads that decide a write stay Strong."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from retrieval.gallery.milvus_store import MilvusGalleryStore
    from serving.cli import open_store, serve_parser

    with pytest.raises(ValueError, match="consistency must be one of"):
        MilvusGalleryStore(str(tmp_path / "x.db"), consistency="linearizable")
    args = serve_parser().parse_args(["--model", "m.onnx", "--gallery-backend", "milvus", "--milvus-uri",
                                      str(tmp_path / "m.db"), "--milvus-consistency", "bounded"])
    store = open_store(args)
    levels: list[tuple[str, str]] = []
    for name in ("search", "query", "get"):
        original = getattr(store.client, name)

        def recorded(*a, _name=name, _original=original, **kw):
            levels.append((_name, kw.get("consistency_level")))
            return _original(*a, **kw)

        setattr(store.client, name, recorded)
    try:
        vecs, meta = _data(40)
        store.create("g", 16)
        store.add("g", np.arange(1, 41), vecs, meta)
        assert ("get", "Strong") in levels  # the clash check before the insert
        levels.clear()
        store.search("g", vecs[:2], 5, [], rerank=RerankOptions(k1=4, k2=2, pool=10))
        assert levels and all(level == "Bounded" for _, level in levels), levels
    finally:
        store.close()


def test_milvus_gallery_dropped_or_remade_through_another_replica(tmp_path):
    """This replica cached the gallery's description: after a drop elsewhere every call answered
    UNAVAILABLE (which clients retry) until a restart, and a gallery made anew with another
    dimension was judged by the old one."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from retrieval.gallery.milvus_store import _collection

    store = open_milvus_store(tmp_path)
    try:
        store.create("g", 4)
        store.add("g", np.array([1]), np.ones((1, 4)), [EntryMetadata()])
        assert store.search("g", np.ones((1, 4)), 1, [])[0][0].id == 1
        store.client.drop_collection(_collection("g"))  # as another replica's DropGallery does
        for call in (lambda: store.search("g", np.ones((1, 4)), 1, []), lambda: store.info("g"),
                     lambda: store.add("g", np.array([2]), np.ones((1, 4)), [EntryMetadata()]), lambda: store.remove("g", [1])):
            with pytest.raises(GalleryNotFound, match="no gallery named 'g'"):
                call()
        # another replica (a second store on the same Milvus) makes it anew, 8-d: this one follows
        args = {k: v for k, v in store._connect_args.items() if k not in ("uri", "dedicated")}
        other = type(store)(store.uri, **args)
        other.create("g", 8)
        other.close()
        assert [(g.name, g.dim) for g in store.list()] == [("g", 8)]
        store.add("g", np.array([3]), np.ones((1, 8)), [EntryMetadata()])
        assert [h.id for h in store.search("g", np.ones((1, 8)), 5, [])[0]] == [3]
        with pytest.raises(InvalidEntry, match="holds 8-d embeddings, got 4-d"):
            store.search("g", np.ones((1, 4)), 1, [])
    finally:
        close_milvus_store(store)


def test_gallery_dimensions_need_no_entry_counts(store):
    """reid-serve's startup check of gallery widths went through ``list``, which on Milvus counts
    every gallery's entries (a Strong read each, about 300 ms on a server)."""
    store.create("a", 4)
    store.create("b", 8)
    store.add("b", np.array([1]), np.ones((1, 8)), [EntryMetadata()])
    if hasattr(store, "_count"):
        store._count = lambda name: (_ for _ in ()).throw(AssertionError("counted the entries of " + name))
    assert store.dimensions() == {"a": 4, "b": 8}


def test_milvus_searches_run_beside_each_other(tmp_path):
    """Searches held the store's lock: at Strong consistency each waits about 300 ms for a Milvus
    server's time tick, so concurrent searches queued behind one another. Two searches must be
    inside Milvus at the same time here (a barrier of two), or both would fail."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    store = open_milvus_store(tmp_path)
    try:
        store.create("g", 4)
        store.add("g", np.array([1, 2]), np.eye(4)[:2], [EntryMetadata()] * 2)
        together, search = threading.Barrier(2, timeout=10), store.client.search

        def search_at_the_barrier(*args, **kwargs):
            together.wait()
            return search(*args, **kwargs)

        store.client.search = search_at_the_barrier
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda q: store.search("g", q[None], 1, []), np.eye(4)[:2]))
        assert [a[0][0].id for a in answers] == [1, 2]
    finally:
        close_milvus_store(store)


def test_milvus_calls_that_lost_the_connection_together_reconnect_once(tmp_path):
    """Searches no longer take the store's lock, so several can find the connection lost at once:
    the first replaces the client, the others use its replacement instead of replacing it again."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    store = open_milvus_store(tmp_path)
    try:
        broken = store.client
        first = store._reconnect(broken)
        assert first is not broken and store.client is first
        assert store._reconnect(broken) is first  # a second caller that saw the same broken client
        assert store._reconnect(first) is not first  # a new failure replaces the replacement
    finally:
        close_milvus_store(store)


def test_milvus_store_reconnects_after_a_lost_connection(tmp_path, caplog, monkeypatch):
    """A client whose connection broke waits out gRPC's reconnect backoff (up to 2 minutes) after
    Milvus is back; the store makes a new one at once. Reads are retried, writes are not."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from pymilvus import MilvusException
    from pymilvus.client.types import Status

    from retrieval.gallery.base import StorageError
    from retrieval.gallery.milvus_store import MilvusGalleryStore

    store = MilvusGalleryStore(str(tmp_path / "m.db"))
    vecs, meta = _data(10)

    def break_once(method: str) -> None:
        client = store.client
        original = getattr(client, method)

        def fail(*args, **kwargs):
            setattr(client, method, original)
            raise MilvusException(code=Status.CONNECT_FAILED, message="Fail connecting to server")

        setattr(client, method, fail)

    try:
        store.create("g", 16)
        store.add("g", np.arange(1, 6), vecs[:5], meta[:5])
        first = store.client
        break_once("list_collections")
        assert [g.name for g in store.list()] == ["g"]  # a read: reconnected and answered
        assert store.client is not first and "reconnected to Milvus" in caplog.text
        break_once("insert")
        with pytest.raises(StorageError, match="connection lost.*retry the call"):
            store.add("g", np.arange(6, 11), vecs[5:], meta[5:])  # a write: not repeated behind the caller's back
        store.add("g", np.arange(6, 11), vecs[5:], meta[5:])  # the caller's retry goes through
        assert store.info("g").size == 10
        other = store.client
        original = other.list_collections
        other.list_collections = lambda *a, **k: (_ for _ in ()).throw(MilvusException(code=1, message="refused"))
        with pytest.raises(StorageError, match="refused"):
            store.list()  # Milvus answered with an error: no reconnect
        assert store.client is other
        other.list_collections = original
        # Milvus still down when reconnecting: that call fails, and the next one connects again.
        import pymilvus

        real_client = pymilvus.MilvusClient

        def unreachable(*args, **kwargs):
            raise MilvusException(code=Status.CONNECT_FAILED, message="Fail connecting to server")

        monkeypatch.setattr(pymilvus, "MilvusClient", unreachable)
        break_once("list_collections")
        with pytest.raises(StorageError, match="cannot reconnect"):
            store.list()
        with pytest.raises(StorageError, match="cannot reconnect"):
            store.info("g")  # still down: tried again, not stuck on a closed client
        monkeypatch.setattr(pymilvus, "MilvusClient", real_client)
        assert store.info("g").size == 10  # back: the first call after reconnects
    finally:
        store.close()


def test_a_gallery_dir_that_is_a_file_is_named_so(tmp_path):
    """It was "cannot open gallery directory PATH: File exists" (mkdir's words)."""
    path = tmp_path / "galleries"
    path.write_text("not a folder")
    with pytest.raises(GalleryError, match=rf"^gallery directory {path} is a file; give a folder \(made if missing\)$"):
        FaissGalleryStore(path)
    assert path.read_text() == "not a folder"


@pytest.mark.parametrize("call, code, opens", [("lockf", "ENOLCK", True), ("open", "EROFS", True), ("open", "EACCES", False)])
def test_a_gallery_dir_that_cannot_be_locked(tmp_path, monkeypatch, caplog, call, code, opens):
    """Only a lock held by another process means another owner: a filesystem without locks (ENOLCK)
    or a read-only one (a replica searching a read-only mount, which opened before there was a lock)
    opens with a warning; a lock file this user may not write is an error that says so."""
    import errno
    import os

    from retrieval import owner_lock

    store = FaissGalleryStore(tmp_path)  # a gallery made beforehand, to search afterwards
    store.add(store.create("g", 4).name, np.array([1]), np.ones((1, 4)), [EntryMetadata()])
    store.close()
    real_open = os.open

    def failing(path_or_fd, *args):
        if call == "lockf" or str(path_or_fd).endswith(owner_lock.LOCK_NAME):
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
        return real_open(path_or_fd, *args)

    monkeypatch.setattr(owner_lock.fcntl if call == "lockf" else owner_lock.os, call, failing)
    if not opens:
        with pytest.raises(GalleryError, match=r"\.owner\.lock: permission denied; make it writable by this user"):
            FaissGalleryStore(tmp_path)
        return
    store = FaissGalleryStore(tmp_path)
    assert [h.id for h in store.search("g", np.ones((1, 4)), 1, [])[0]] == [1]
    assert f"cannot lock {tmp_path / owner_lock.LOCK_NAME}" in caplog.text
    store.close()


def test_searching_a_gallery_with_no_entries_answers_each_query_with_no_hits(store):
    """A new gallery, or one whose every entry was removed: no hits for each query, whatever the
    kind of search (the removed ones are still rows of a FAISS index until a snapshot compacts it)."""
    store.create("g", 8)
    queries = np.random.default_rng(0).normal(size=(3, 8))
    for rerank, by_person in [(None, False), (RerankOptions(), False), (None, True), (RerankOptions(), True)]:
        assert store.search("g", queries, 5, [], rerank, group_by_person=by_person) == [[], [], []]
    store.add("g", np.array([1, 2]), queries[:2], [EntryMetadata("a"), EntryMetadata("b")])
    store.remove("g", np.array([1, 2]))
    for rerank, by_person in [(None, False), (RerankOptions(), False), (None, True)]:
        assert store.search("g", queries, 5, [SearchFilter(exclude_camera_id="c1")] * 3, rerank, by_person) == [[], [], []]


def test_faiss_threads_follow_a_cpu_quota(tmp_path, monkeypatch, caplog):
    """OpenMP gives every FAISS search as many threads as the process sees cores: in a container
    limited to 1 CPU on a 64-core host, 64 threads per search, throttled by the quota."""
    import os

    import faiss

    import retrieval.cpu_quota
    from retrieval.faiss_setup import _fit_threads_to_quota, import_faiss

    before = faiss.omp_get_max_threads()
    monkeypatch.setattr(retrieval.cpu_quota, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    faiss.omp_set_num_threads(64)
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "64")  # the operator's choice stands
        _fit_threads_to_quota.cache_clear()
        import_faiss()
        assert faiss.omp_get_max_threads() == 64
        monkeypatch.delenv("OMP_NUM_THREADS")
        _fit_threads_to_quota.cache_clear()
        with caplog.at_level("INFO", logger="retrieval.faiss_setup"):
            import_faiss()
        assert faiss.omp_get_max_threads() == 1
        assert "a CPU quota allows 1 core(s): FAISS searches use 1 OpenMP threads, not 64" in caplog.text
    finally:
        faiss.omp_set_num_threads(before)
        _fit_threads_to_quota.cache_clear()


@pytest.mark.parametrize("installed", [True, False])
def test_a_milvus_lite_that_cannot_be_imported_is_named_with_its_reason(tmp_path, installed):
    """pymilvus turns any ImportError from Milvus Lite into "milvus-lite is required ... pip install",
    also when it is installed and one of its own imports failed (seen: pyarrow built for NumPy 2
    beside NumPy 1.26, which reid's dependencies allow)."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    import os
    import subprocess
    from pathlib import Path

    fake = tmp_path / "site" / "milvus_lite"  # found before the real one
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "server_manager.py").write_text('raise ImportError("pyarrow requires NumPy 2.0 or newer, found 1.26.4")')
    hide = "" if installed else "sys.modules['milvus_lite'] = None  # as if not installed\n"
    code = ("import sys\n" + hide +
            "from retrieval.gallery.base import GalleryError\n"
            "from retrieval.gallery.milvus_store import MilvusGalleryStore\n"
            "try:\n"
            f"    MilvusGalleryStore({str(tmp_path / 'm.db')!r})\n"
            "except GalleryError as exc:\n"
            "    print(exc)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(root)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("milvus-lite is installed but cannot be imported: pyarrow requires NumPy 2.0 or newer, found 1.26.4"
                                  if installed else "a Milvus Lite file (.db) needs milvus-lite (pip install '.[milvus]')")
