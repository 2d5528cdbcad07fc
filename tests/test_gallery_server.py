"""Gallery RPCs against a real server: round trips, errors, crash durability, concurrency,
and `reid evaluate` through the server agreeing with offline evaluation."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from retrieval.distance import l2_normalize
from retrieval.gallery import FaissGalleryStore
from serving.engines import decode_image
from serving.client import GalleryClient, metadata_message
from serving.engines.onnxruntime import OnnxRuntimeEngine
from serving.proto import reid_pb2
from serving.server import ServerConfig
from tests.conftest import MILVUS_URI, drop_test_galleries, open_milvus_store, quick_overrides
from tests.serving_support import ServerThread
from training.cli import main as reid_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["faiss", "milvus"])
def server(request, tiny_onnx, tmp_path):
    store = FaissGalleryStore(tmp_path / "galleries") if request.param == "faiss" else open_milvus_store(tmp_path)
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0))
    thread.server.store = store  # the server closes it when it stops
    with thread as s:
        try:
            yield s
        finally:
            if request.param == "milvus":
                drop_test_galleries(store)  # on a shared server (REID_MILVUS_URI): what the test made


def test_round_trip_filters_and_errors(server):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(50, 32)).astype(np.float32)
    with GalleryClient(server.target) as g:
        info = g.create("people")
        assert info.dimension == 32 and info.backend in ("faiss", "milvus")
        ids = g.add("people", embeddings=vecs, metadata=[metadata_message(str(i), f"c{i % 2}", float(i)) for i in range(50)],
                    ids=range(1, 51))
        assert ids == list(range(1, 51)) and g.info("people").size == 50
        assigned = g.add("people", embeddings=vecs[:2])  # ids chosen by the server
        assert len(set(assigned)) == 2 and not set(assigned) & set(ids)
        assert g.remove("people", assigned).removed == 2
        results = g.search("people", embeddings=vecs[:3], top_k=5)
        sims = l2_normalize(vecs[:3]) @ l2_normalize(vecs).T
        for q, r in enumerate(results):
            assert [h.id for h in r.hits] == (np.argsort(-sims[q], kind="stable")[:5] + 1).tolist()
            np.testing.assert_allclose([h.score for h in r.hits], np.sort(sims[q])[::-1][:5], atol=1e-5)
        filtered = g.search("people", embeddings=vecs[:1], top_k=50, filters=[reid_pb2.SearchFilter(exclude_camera_id="c0")])
        assert len(filtered[0].hits) == 25 and all(h.metadata.camera_id == "c1" for h in filtered[0].hits)
        removed = g.remove("people", [1, 2, 999])
        assert removed.removed == 2 and list(removed.missing) == [999]
        assert all(h.id not in (1, 2) for h in g.search("people", embeddings=vecs[:1], top_k=50)[0].hits)
        for call, code in [
            (lambda: g.add("people", embeddings=vecs[:1, :8]), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: g.add("people", embeddings=np.full((1, 32), np.nan)), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: g.add("people", embeddings=np.zeros((1, 32))), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: g.search("people", embeddings=np.zeros((1, 32))), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: g.add("people", embeddings=vecs[:1], ids=[5]), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: g.search("nobody", embeddings=vecs[:1]), grpc.StatusCode.NOT_FOUND),
            (lambda: g.search("people", embeddings=vecs[:1], top_k=10**6), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: g.create("people"), grpc.StatusCode.ALREADY_EXISTS),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code, err.value.details()
        assert g.add("people", embeddings=vecs[:1], ids=[5], replace=True) == [5]
        gone = g.remove("people", person_ids=["7", "nobody"])  # the entry with id 8 carries person "7"
        assert (gone.removed, list(gone.missing_person_ids)) == (1, ["nobody"]) and g.info("people").size == 47
        for call, code in [(lambda: g.remove("people", ids=[3], person_ids=["1"]), grpc.StatusCode.INVALID_ARGUMENT),
                           (lambda: g.remove("people", person_ids=[""]), grpc.StatusCode.INVALID_ARGUMENT),
                           (lambda: g.remove("nobody", person_ids=["1"]), grpc.StatusCode.NOT_FOUND)]:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code, err.value.details()
        assert [i.name for i in g.list()] == ["people"]
        g.drop("people")
        assert g.list() == []


def test_entries_list_what_a_gallery_holds_page_by_page(server):
    vecs = np.random.default_rng(2).normal(size=(30, 32)).astype(np.float32)
    with GalleryClient(server.target) as g:
        g.create("people")
        ids = g.add("people", embeddings=vecs, metadata=[metadata_message(str(i % 4), "c1", float(i), {"n": str(i)}) for i in range(30)],
                    ids=range(30, 0, -1))  # the highest id first
        listed = list(g.entries("people", page_size=7, include_embeddings=True))
        assert [e.id for e in listed] == sorted(ids)
        for e in listed:
            i = ids.index(e.id)
            assert (e.metadata.person_id, e.metadata.timestamp, dict(e.metadata.labels)) == (str(i % 4), float(i), {"n": str(i)})
            np.testing.assert_allclose(e.embedding.values, l2_normalize(vecs[i : i + 1])[0], atol=1e-6)
        theirs = list(g.entries("people", person_ids=["1"]))
        assert [e.id for e in theirs] == sorted(ids[i] for i in range(1, 30, 4)) and not theirs[0].HasField("embedding")
        window = reid_pb2.SearchFilter(time_from=10, time_to=12, labels={"n": "11"})
        assert [e.metadata.timestamp for e in g.entries("people", filter=window)] == [11.0]
        page = g.stub.ListEntries(reid_pb2.ListEntriesRequest(gallery="people", page_size=7, after_id=7), timeout=10)
        assert [e.id for e in page.entries] == list(range(8, 15)) and page.next_after_id == 14
        last = g.stub.ListEntries(reid_pb2.ListEntriesRequest(gallery="people", after_id=25), timeout=10)
        assert [e.id for e in last.entries] == list(range(26, 31)) and last.next_after_id == 0
        for request, code in [(reid_pb2.ListEntriesRequest(gallery="nobody"), grpc.StatusCode.NOT_FOUND),
                              (reid_pb2.ListEntriesRequest(gallery="people", page_size=10_001), grpc.StatusCode.INVALID_ARGUMENT),
                              (reid_pb2.ListEntriesRequest(gallery="people", after_id=2**63), grpc.StatusCode.INVALID_ARGUMENT),
                              (reid_pb2.ListEntriesRequest(gallery="people", person_ids=[""]), grpc.StatusCode.INVALID_ARGUMENT),
                              (reid_pb2.ListEntriesRequest(gallery="people", filter=reid_pb2.SearchFilter(time_from=2, time_to=1)),
                               grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as err:
                g.stub.ListEntries(request, timeout=10)
            assert err.value.code() == code, err.value.details()


def test_entries_of_the_gallery_search_as_queries(server):
    """ "Where else was this one seen?": an entry's stored embedding as the query."""
    vecs = np.random.default_rng(5).normal(size=(20, 32)).astype(np.float32)
    with GalleryClient(server.target) as g:
        g.create("g", index_type="hnsw")
        g.add("g", embeddings=vecs, metadata=[metadata_message(str(i % 5), f"c{i % 2}") for i in range(20)], ids=range(1, 21))
        by_entry = g.search("g", entry_ids=[3, 999, 8], top_k=4)
        by_vector = g.search("g", embeddings=vecs[[2, 7]], top_k=4)
        assert [[h.id for h in r.hits] for r in (by_entry[0], by_entry[2])] == [[h.id for h in r.hits] for r in by_vector]
        assert by_entry[0].hits[0].id == 3 and by_entry[0].hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert by_entry[1].error.code == grpc.StatusCode.NOT_FOUND.value[0] and "no entry 999" in by_entry[1].error.message
        elsewhere = g.search("g", entry_ids=[3], top_k=4, filters=[reid_pb2.SearchFilter(exclude_camera_id="c0")],
                             group_by_person=True)[0]  # entry 3 is on c0: other cameras only, one hit per person
        assert 3 not in [h.id for h in elsewhere.hits] and {h.metadata.camera_id for h in elsewhere.hits} == {"c1"}
        assert len({h.metadata.person_id for h in elsewhere.hits}) == len(elsewhere.hits) == 4
        reranked = g.search("g", entry_ids=[3], top_k=3, rerank={})
        assert reranked[0].hits[0].id == 3
        for call in (lambda: g.search("g", entry_ids=[3], embeddings=vecs[:1]), lambda: g.search("g", entry_ids=[2**63])):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            g.search("nobody", entry_ids=[3])
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_entry_pages_stay_under_grpcs_default_message_limit(server):
    """A client that keeps gRPC's 4 MiB limit on what it receives can list wide embeddings: the
    server sends fewer entries than asked for rather than a page the client would refuse."""
    dim = 32768  # 128 KiB per embedding: a full page of 1000 would be 128 MiB
    vecs = np.random.default_rng(3).normal(size=(40, dim)).astype(np.float32)
    with GalleryClient(server.target) as g:
        g.create("wide", dimension=dim)
        g.add("wide", embeddings=vecs, ids=range(1, 41))
    with GalleryClient(server.target, max_message_bytes=4 * 2**20) as g:
        first = g.stub.ListEntries(reid_pb2.ListEntriesRequest(gallery="wide", include_embeddings=True), timeout=30)
        assert 16 <= len(first.entries) < 40 and first.next_after_id == first.entries[-1].id
        listed = list(g.entries("wide", include_embeddings=True))
    assert [e.id for e in listed] == list(range(1, 41))
    np.testing.assert_allclose([e.embedding.values for e in listed[-2:]], l2_normalize(vecs[-2:]), atol=1e-6)


def test_the_asyncio_gallery_client_does_what_the_blocking_one_does(server, synthetic_root):
    import asyncio

    from serving.client import AsyncGalleryClient

    files = [str(f) for f in sorted((synthetic_root / "bounding_box_test").iterdir())[:4]]
    vecs = np.random.default_rng(1).normal(size=(6, 32)).astype(np.float32)

    async def session():
        async with AsyncGalleryClient(server.target) as g:
            assert (await g.create("aio", index_type="hnsw")).index_type == reid_pb2.HNSW
            ids = await g.add("aio", embeddings=vecs, metadata=[metadata_message(str(i % 2)) for i in range(6)])
            image_ids = await g.add("aio", images=files[:2], metadata=[metadata_message("img")] * 2)
            assert [i.name for i in await g.list()] == ["aio"] and (await g.info("aio")).size == 8
            plain, grouped = await asyncio.gather(g.search("aio", embeddings=vecs[:1], top_k=3),
                                                  g.search("aio", embeddings=vecs[:1], top_k=3, group_by_person=True))
            assert plain[0].hits[0].id == ids[0] and len({h.metadata.person_id for h in grouped[0].hits}) == 3
            found = await g.search("aio", images=files[1:2], top_k=1, rerank={"k1": 2, "k2": 1})
            assert found[0].hits[0].id == image_ids[1]
            assert [e.id async for e in g.entries("aio", person_ids=["1"], page_size=2)] == sorted(ids[1::2])
            gone = await g.remove("aio", person_ids=["0"])
            assert gone.removed == 3 and (await g.remove("aio", ids=[ids[1], 999])).missing == [999]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await g.info("nobody")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            await g.drop("aio")
            return await g.list()

    assert asyncio.run(session()) == []


def test_images_are_embedded_by_the_server(server, synthetic_root):
    files = sorted((synthetic_root / "bounding_box_test").iterdir())[:6]
    with GalleryClient(server.target) as g:
        g.create("imgs")
        ids = g.add("imgs", images=[str(f) for f in files])
        results = g.search("imgs", images=[str(files[2]), str(files[4])], top_k=1)
        assert [r.hits[0].id for r in results] == [ids[2], ids[4]]
        assert results[0].hits[0].score == pytest.approx(1.0, abs=1e-4)
        bad = g.search("imgs", images=[b"junk", str(files[0])], top_k=1)
        assert bad[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad[1].hits[0].id == ids[0]
        with pytest.raises(grpc.RpcError) as err:
            g.add("imgs", images=[str(files[0]), b"junk"])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1" in err.value.details()
        assert g.info("imgs").size == 6  # the failed add added nothing


def test_gallery_calls_report_their_latency_and_the_store_time(server, synthetic_root):
    """Search and AddToGallery had no latency metric: an operator could not see a slow gallery."""
    metrics = server.metrics
    files = [str(f) for f in sorted((synthetic_root / "bounding_box_test").iterdir())[:2]]
    with GalleryClient(server.target) as g:
        g.create("timed")
        g.add("timed", images=files)
        g.search("timed", images=files[:1], top_k=1)
        with pytest.raises(grpc.RpcError):
            g.search("nobody", embeddings=np.ones((1, 32), np.float32))
    deadline = time.monotonic() + 5  # a failed call's status reaches the caller before the server's handler has unwound
    while (counts := {m: metrics.value("reid_request_seconds_count", method=m)
                      for m in ("CreateGallery", "AddToGallery", "Search")})["Search"] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counts == {"CreateGallery": 1, "AddToGallery": 1, "Search": 2}
    assert metrics.value("reid_request_seconds_sum", method="AddToGallery") > 0
    assert metrics.value("reid_stage_seconds_count", stage="gallery") == 4  # each store call, the failed one too


def test_gallery_sizes_are_exported_at_each_scrape(server, monkeypatch, caplog):
    from prometheus_client import generate_latest

    from retrieval.gallery import StorageError

    metrics = server.metrics
    vecs = np.random.default_rng(4).normal(size=(6, 32)).astype(np.float32)
    with GalleryClient(server.target) as g:
        g.create("a")
        g.create("b")
        g.add("a", embeddings=vecs, metadata=[metadata_message(str(i % 2)) for i in range(6)])
        assert [metrics.value("reid_gallery_entries", gallery=n) for n in "ab"] == [6, 0]
        g.remove("a", person_ids=["1"])
        assert metrics.value("reid_gallery_entries", gallery="a") == 3

    def unavailable():
        raise StorageError("Milvus list failed: connection refused")

    monkeypatch.setattr(server.server.store, "list", unavailable)
    scraped = generate_latest(metrics.registry).decode()  # the other metrics still come
    assert "reid_requests_total" in scraped and 'reid_gallery_entries{' not in scraped
    assert "cannot read the galleries' sizes: Milvus list failed" in caplog.text


def test_concurrent_adds_and_searches_stay_consistent(server):
    rng = np.random.default_rng(1)
    with GalleryClient(server.target) as g:
        g.create("busy")

        def writer(w):
            vecs = rng.normal(size=(20, 32)).astype(np.float32)
            return g.add("busy", embeddings=vecs, ids=range(w * 1000 + 1, w * 1000 + 21))

        def reader(_):
            r = g.search("busy", embeddings=rng.normal(size=(2, 32)), top_k=5)
            return all(len(x.hits) <= 5 for x in r)

        with ThreadPoolExecutor(8) as pool:
            writes = [pool.submit(writer, w) for w in range(10)]
            reads = [pool.submit(reader, i) for i in range(30)]
            assert all(f.result() for f in reads)
            written = sorted(i for f in writes for i in f.result())
        assert g.info("busy").size == 200 == len(set(written))


def test_kill_9_loses_no_acknowledged_entry(tiny_onnx, tmp_path):
    gallery_dir = tmp_path / "g"

    def start():
        proc = subprocess.Popen([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                                 "--model", str(tiny_onnx), "--port", "0", "--gallery-dir", str(gallery_dir)],
                                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if " on 127.0.0.1:" in line:
                return proc, f"127.0.0.1:{int(line.split('127.0.0.1:')[1].split()[0])}"
        proc.kill()
        proc.stderr.close()
        raise AssertionError("server did not start")

    proc, target = start()
    acked: list[int] = []
    rng = np.random.default_rng(2)
    try:
        with GalleryClient(target, timeout=10) as g:
            g.create("crash")
            import threading

            def killer():
                time.sleep(1.0)
                proc.send_signal(signal.SIGKILL)

            threading.Thread(target=killer).start()
            for i in range(100000):
                try:
                    acked += g.add("crash", embeddings=rng.normal(size=(3, 32)), ids=[3 * i + 1, 3 * i + 2, 3 * i + 3])
                except grpc.RpcError:
                    break
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL and len(acked) > 0
    finally:
        proc.kill()
        proc.stderr.close()
    proc, target = start()
    try:
        with GalleryClient(target) as g:
            size = g.info("crash").size
            assert size >= len(acked)  # every acknowledged entry survived
            assert size - len(acked) in (0, 3)  # at most the one in-flight request, whole, never a partial one
            hits = g.search("crash", embeddings=rng.normal(size=(1, 32)), top_k=size)[0].hits
            assert set(acked) <= {h.id for h in hits}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_an_index_type_the_server_does_not_know_is_refused(server):
    """It became a flat gallery without a word (a newer client's index type, or a typo'd number)."""
    with GalleryClient(server.target) as g:
        with pytest.raises(grpc.RpcError) as err:
            g.stub.CreateGallery(reid_pb2.CreateGalleryRequest(name="odd", index_type=7))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "index_type 7" in err.value.details()
        assert g.list() == []


def test_evaluate_through_server_agrees_with_offline(server, tiny_onnx, synthetic_root, tmp_path, caplog):
    overrides = quick_overrides(synthetic_root, tmp_path, **{"re_ranking.re_ranking": "True", "re_ranking.k1": 6,
                                                            "re_ranking.k2": 3})
    assert reid_main(["evaluate", *overrides, f"results_dir={tmp_path / 'offline'}", f"evaluate.checkpoint={tiny_onnx}"]) == 0
    assert reid_main(["evaluate", *overrides, f"results_dir={tmp_path / 'served'}", f"evaluate.server={server.target}",
                      f"evaluate.checkpoint={tmp_path / 'unused.pth'}"]) == 0
    assert f"evaluate.checkpoint={tmp_path / 'unused.pth'} is not used: evaluate.server=" in caplog.text
    offline = json.loads((tmp_path / "offline" / "evaluate" / "results.json").read_text())["results"]
    served = json.loads((tmp_path / "served" / "evaluate" / "results.json").read_text())["results"]
    for label in ("without re-ranking", "with re-ranking"):
        assert served[label]["mAP"] == pytest.approx(offline[label]["mAP"], abs=1e-3), label
        assert served[label]["rank1"] == pytest.approx(offline[label]["rank1"], abs=1e-3), label
    with GalleryClient(server.target) as g:
        assert g.list() == []  # the temporary gallery is gone


def test_evaluate_through_server_splits_searches_whose_answers_exceed_the_message_limit(tiny_onnx, synthetic_root, tmp_path,
                                                                                      monkeypatch):
    """Every query asks for the whole gallery: at Market-1501 scale one call for all queries would
    answer with about 1.7 GB of hits, far over the server's 64 MiB message limit."""
    import training.evaluate
    from training.config.load import build_spec
    from training.data.market1501 import load_query_gallery
    from training.evaluate import score, score_via_server

    spec = build_spec({}, quick_overrides(synthetic_root, tmp_path))
    query, gallery = load_query_gallery(spec.dataset.query_dataset_dir, spec.dataset.test_dataset_dir, "evaluate")
    engine = OnnxRuntimeEngine(tiny_onnx)
    offline, _, _ = score(*(engine.embed_images([decode_image(Path(r.path).read_bytes()) for r in split])
                            for split in (query, gallery)), query, gallery, spec.re_ranking)
    all_hits = len(query) * len(gallery)
    monkeypatch.setattr(training.evaluate, "_HITS_PER_SEARCH", all_hits // 4)  # 4 calls or so
    # a limit one answer for all queries would exceed (about 26 bytes a hit), but a quarter fits
    config = ServerConfig(port=0, max_message_bytes=all_hits * 26 // 2)
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), config)
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    with thread as s:
        served, _, _, _ = score_via_server(s.target, query, gallery, spec.re_ranking, chunk=1)
        searches = s.metrics.requests.labels("Search", "OK")._value.get()
    assert searches == -(-len(query) // (all_hits // 4 // len(gallery)))
    assert served["without re-ranking"]["mAP"] == pytest.approx(offline["without re-ranking"]["mAP"], abs=1e-6)


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EROFS"])
def test_unwritable_storage_fails_writes_clearly_and_reads_go_on(server, monkeypatch, errno_name, caplog):
    """Disk full / read-only directory, injected at the log write (root ignores file permissions here).
    The server logs it (it told the caller only, found with a real full disk), once a minute at most."""
    import errno

    import serving.gallery_service

    if not isinstance(server.server.store, FaissGalleryStore):
        pytest.skip("the write-ahead log belongs to the FAISS backend")

    from retrieval.gallery.wal import WriteAheadLog

    vecs = np.random.default_rng(3).normal(size=(4, 32)).astype(np.float32)
    with GalleryClient(server.target) as g:
        g.create("full")
        g.add("full", embeddings=vecs[:2])

        def broken(self, payload):
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

        monkeypatch.setattr(WriteAheadLog, "append", broken)
        with pytest.raises(grpc.RpcError) as err:
            g.add("full", embeddings=vecs[2:])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cannot write the log of gallery full" in err.value.details()
        with pytest.raises(grpc.RpcError, match="cannot write the log"):  # the same again: not logged
            g.add("full", embeddings=vecs[2:])
        with pytest.raises(grpc.RpcError) as missing:  # the caller's mistake: not logged
            g.info("nope")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        logged = [r.getMessage() for r in caplog.records if r.name == "serving.gallery_service"]
        assert logged == [f"AddToGallery failed: {err.value.details()}"]
        with pytest.MonkeyPatch.context() as later:  # a minute on, it is logged again, with the count left out
            later.setattr(serving.gallery_service, "FAULT_LOG_SECONDS", 0.0)
            with pytest.raises(grpc.RpcError):
                g.add("full", embeddings=vecs[2:])
        logged = [r.getMessage() for r in caplog.records if r.name == "serving.gallery_service"]
        assert logged[1:] == [f"AddToGallery failed: {err.value.details()} "
                              "(1 gallery failure(s) since the last line left out of the log)"]
        assert g.info("full").size == 2  # nothing half-applied
        assert [h.id for h in g.search("full", embeddings=vecs[:1], top_k=2)[0].hits][0] == 1  # reads go on
        monkeypatch.undo()
        assert g.add("full", embeddings=vecs[2:]) == [3, 4]  # and writes resume once the disk is back


def test_second_server_on_one_milvus_lite_file_is_refused_clearly(tiny_onnx, tmp_path):
    """Milvus Lite is single-process: sharing a gallery between replicas needs a Milvus server."""
    pytest.importorskip("pymilvus", reason="the Milvus backend needs pymilvus and milvus-lite (extra 'milvus')")
    from retrieval.gallery.milvus_store import MilvusGalleryStore

    uri = str(tmp_path / "shared.db")
    first = MilvusGalleryStore(uri)
    try:
        result = subprocess.run([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                                 "--model", str(tiny_onnx), "--port", "0", "--gallery-backend", "milvus", "--milvus-uri", uri],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines()[-1].startswith("reid-serve: error: cannot connect to Milvus at")
    finally:
        first.close()


def test_second_server_on_one_faiss_gallery_dir_is_refused_until_the_first_closes(tiny_onnx, tmp_path):
    """Two servers on one --gallery-dir each appended to the same log and wrote snapshots over the
    other's, losing acknowledged entries without a word."""
    first = FaissGalleryStore(tmp_path / "g")
    first.create("held", 8)
    serve = [sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
             "--model", str(tiny_onnx), "--port", "0", "--gallery-dir", str(tmp_path / "g")]
    try:
        result = subprocess.run(serve, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"reid-serve: error: gallery directory {tmp_path / 'g'} is in use by another process "
                               f"(pid {os.getpid()} on ")
        assert "--gallery-backend milvus" in line
    finally:
        first.close()
    opened = subprocess.run([sys.executable, "-c", "import sys; from retrieval.gallery import FaissGalleryStore; "
                             "print(FaissGalleryStore(sys.argv[1]).info('held').dim)", str(tmp_path / "g")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert opened.returncode == 0 and opened.stdout.strip() == "8", opened.stderr  # closing let the next owner in


@pytest.mark.skipif(not MILVUS_URI, reason="needs a Milvus server: set REID_MILVUS_URI=http://host:19530 (one without galleries)")
def test_two_replicas_share_a_gallery_on_a_milvus_server(tiny_onnx, tmp_path):
    """What a Milvus server is for: what one replica writes, the other reads and can remove at once."""
    rng = np.random.default_rng(4)
    vecs = rng.normal(size=(30, 32)).astype(np.float32)
    stores = [open_milvus_store(tmp_path) for _ in range(2)]
    threads = [ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0)) for _ in range(2)]
    for thread, store in zip(threads, stores):
        thread.server.store = store
    with threads[0] as a, threads[1] as b, GalleryClient(a.target) as ga, GalleryClient(b.target) as gb:
        try:
            ga.create("shared")
            ids = ga.add("shared", embeddings=vecs, metadata=[metadata_message(str(i), f"c{i % 2}", float(i)) for i in range(30)],
                         ids=range(1, 31))
            assert gb.info("shared").size == 30 and [i.name for i in gb.list()] == ["shared"]
            sims = l2_normalize(vecs[:2]) @ l2_normalize(vecs).T
            for q, result in enumerate(gb.search("shared", embeddings=vecs[:2], top_k=5)):
                assert [h.id for h in result.hits] == [ids[i] for i in np.argsort(-sims[q], kind="stable")[:5]]
            assert gb.remove("shared", [ids[0]]).removed == 1
            assert ga.info("shared").size == 29
            assert ids[0] not in [h.id for h in ga.search("shared", embeddings=vecs[:1], top_k=5, rerank={})[0].hits]
        finally:
            drop_test_galleries(stores[0])


def test_startup_names_galleries_made_for_another_model(tiny_onnx, tmp_path, caplog):
    """After a model change, every add and image search on an old gallery failed, and only per call."""
    import logging

    store = FaissGalleryStore(tmp_path / "galleries")
    store.create("old", 512)
    store.create("current", 32)
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0))
    thread.server.store = store
    with caplog.at_level(logging.INFO), thread:
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("this model's 32-d embeddings: old (512-d);" in w for w in warnings), warnings
    assert not any("current" in w for w in warnings)
    # where the galleries are, and which: the startup log said neither
    # and how long they took to load, to size a startup probe by (the port opens only after)
    assert [m for m in caplog.messages if m.startswith("galleries: ")] == [
        f"galleries: 2, FAISS in {tmp_path / 'galleries'} (current, old), loaded in 0.0 s"]


def test_images_are_refused_by_a_gallery_another_model_filled(tiny_onnx, synthetic_root, tmp_path, caplog):
    """A retrained model of the same width was searched against the old model's gallery, and every
    answer ranked at random: galleries now record their model, and image calls check it."""
    import logging

    files = [str(f) for f in sorted((synthetic_root / "bounding_box_test").iterdir())[:3]]
    first = OnnxRuntimeEngine(tiny_onnx)
    thread = ServerThread(first, ServerConfig(port=0))
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    with thread as s, GalleryClient(s.target) as g:
        assert g.create("lobby").model == first.model_id != ""
        assert g.create("outside", dimension=8).model == ""  # another width: embeddings from elsewhere
        ids = g.add("lobby", images=files)
        kept = g.search("lobby", images=files[:1], top_k=1)[0].hits[0]
    assert kept.id == ids[0]

    retrained = OnnxRuntimeEngine(tiny_onnx)
    retrained.model_id = "0123456789abcdef"  # as a retrained model of the same width would have
    store = FaissGalleryStore(tmp_path / "galleries")  # the same folder, after a restart
    assert store.info("lobby").model == first.model_id
    thread = ServerThread(retrained, ServerConfig(port=0))
    thread.server.store = store
    with caplog.at_level(logging.WARNING), thread as s, GalleryClient(s.target) as g:
        for call in (lambda: g.search("lobby", images=files[:1]), lambda: g.add("lobby", images=files[:1])):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details().startswith(f"gallery 'lobby' holds embeddings of model {first.model_id}, and this "
                                                  "server embeds images with model 0123456789abcdef")
        vector = first.embed_images([decode_image(Path(files[0]).read_bytes())])
        assert g.search("lobby", embeddings=vector, top_k=1)[0].hits[0].id == ids[0]  # its own model's embeddings: fine
        assert g.info("lobby").size == 3  # nothing was added
        g.create("fresh")
        assert g.add("fresh", images=files[:1]) and g.info("fresh").model == "0123456789abcdef"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"another model than this one (0123456789abcdef): lobby (model {first.model_id})" in w for w in warnings)


def test_engines_name_their_model_by_checkpoint_else_by_file(tiny_onnx, tmp_path):
    import hashlib

    from serving.engines import ModelMetadata

    engine = OnnxRuntimeEngine(tiny_onnx)
    assert engine.model_id == engine.metadata.checkpoint_sha256[:16]  # an FP16 export or engine of it shares it
    plain = tmp_path / "plain.onnx"
    import onnx

    model = onnx.load(str(tiny_onnx))
    del model.metadata_props[:]  # as a model from another tool comes
    onnx.save(model, str(plain))
    other = OnnxRuntimeEngine(plain, fallback=ModelMetadata(64, 32, 0, pixel_mean=[0.5] * 3, pixel_std=[0.25] * 3))
    assert other.model_id == hashlib.sha256(plain.read_bytes()).hexdigest()[:16]


def test_gallery_threads_let_searches_of_one_gallery_run_together(tiny_onnx, tmp_path):
    """Two searches of one gallery must be inside the store at the same time (a barrier of two):
    with --gallery-threads 1 the second would wait for the first, which waits for it."""
    import threading

    from serving.cli import build_config, parse_serve_args

    assert build_config(parse_serve_args(["--model", "m.onnx", "--gallery-threads", "2"])).gallery_threads == 2
    with pytest.raises(ValueError, match=r"gallery_threads \(--gallery-threads\) must be at least 1"):
        build_config(parse_serve_args(["--model", "m.onnx", "--gallery-threads", "0"]))
    store = FaissGalleryStore(tmp_path / "galleries")
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, gallery_threads=2))
    thread.server.store = store
    with thread as s, GalleryClient(s.target) as g:
        dim = g.create("g").dimension
        vecs = np.random.default_rng(2).normal(size=(4, dim)).astype(np.float32)
        g.add("g", embeddings=vecs, ids=[1, 2, 3, 4])
        gallery, together = store.galleries["g"], threading.Barrier(2, timeout=10)
        search = gallery._search
        gallery._search = lambda *args: (together.wait(), search(*args))[1]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda i: g.search("g", embeddings=vecs[i:i + 1], top_k=1), range(2)))
    assert [a[0].hits[0].id for a in answers] == [1, 2]


def test_searches_beyond_the_servers_bounds_are_refused_and_others_go_on(tiny_onnx, synthetic_root, tmp_path):
    """A k1 of 1,000 kept a 5,000-entry gallery's search busy for over ten minutes (and allocated
    30 GiB before the expansion was chunked); a large pool, many queries or queries x top_k, memory
    without bound. Refused with INVALID_ARGUMENT, k1/k2 and hits before any image is embedded."""
    from serving.service import Limits

    limits = Limits(max_rerank_items=500, max_search_hits=1000)
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, limits=limits))
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    vecs = np.random.default_rng(3).normal(size=(100, 32)).astype(np.float32)
    rerank = {"pool": 20, "k1": 5, "k2": 2}
    with thread as s, GalleryClient(s.target, retries=0) as g:
        g.create("g")
        g.add("g", embeddings=vecs)
        assert len(g.search("g", embeddings=vecs[:4], top_k=3, rerank=rerank)) == 4  # 4 x min(100, 20 x 6) = 400 items
        with pytest.raises(grpc.RpcError) as err:
            g.search("g", embeddings=vecs[:6], top_k=3, rerank=rerank)  # 600
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "600" in err.value.details() and "max_rerank_items" in err.value.details()
        assert len(g.search("g", embeddings=vecs[:6], top_k=3, rerank={**rerank, "joint": True})) == 6  # their union: 100
        assert len(g.search("g", embeddings=vecs[:4], top_k=250)[3].hits) == 100  # 1,000 hits asked
        with pytest.raises(grpc.RpcError) as err:
            g.search("g", embeddings=vecs[:4], top_k=251)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1,004 hits" in err.value.details()
        embedded = s.metrics.images.labels("ok")._value.get()
        image = str(next((synthetic_root / "query").iterdir()))
        with pytest.raises(grpc.RpcError) as err:
            g.search("g", images=[image], rerank={"k1": 101})
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 100" in err.value.details()
        assert s.metrics.images.labels("ok")._value.get() == embedded  # refused before the engine ran
        assert g.search("g", images=[image], top_k=2, rerank={})[0].hits  # the server goes on


class _BusyGalleryThread:
    """A server with one gallery thread and a 10-entry gallery "g", whose store holds any search of
    3 queries (the long call) on that thread until ``release`` is set; ``searched`` records the
    query count of every search that reached the store."""

    def __init__(self, tiny_onnx, tmp_path, **config):
        import threading

        self.thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, gallery_threads=1, **config))
        store = self.thread.server.store = FaissGalleryStore(tmp_path / "galleries")
        self.searched, self.release = [], threading.Event()
        real_search = store.search

        def search(name, queries, *args, **kwargs):
            self.searched.append(len(queries))
            if len(queries) == 3:
                self.release.wait(30)
            return real_search(name, queries, *args, **kwargs)

        store.search = search
        self.vecs = np.random.default_rng(0).normal(size=(10, 32)).astype(np.float32)

    def __enter__(self):
        s = self.thread.__enter__()
        with GalleryClient(s.target) as g:
            g.create("g")
            g.add("g", embeddings=self.vecs)
        return s

    def __exit__(self, *exc):
        self.release.set()
        return self.thread.__exit__(*exc)

    def hold(self, pool: ThreadPoolExecutor, g: GalleryClient):
        """The long call, once it holds the gallery thread."""
        call = pool.submit(g.search, "g", embeddings=self.vecs[:3])
        while not self.searched:
            time.sleep(0.01)
        return call


def _wait_for_gallery_calls(s, most: int) -> None:
    """Until the server holds at most ``most`` gallery calls (it lets go of calls a moment after
    their callers do)."""
    end = time.monotonic() + 10
    while s.metrics.value("reid_gallery_calls") > most and time.monotonic() < end:
        time.sleep(0.01)


def test_a_gallery_call_whose_deadline_passes_while_it_waits_for_the_pool_never_runs(tiny_onnx, tmp_path):
    """Behind a long call, searches whose callers gave up are dropped from the gallery pool's
    queue instead of running for nobody (a flood of them would otherwise keep it busy)."""
    from serving.client import search_request

    busy = _BusyGalleryThread(tiny_onnx, tmp_path)
    with busy as s, GalleryClient(s.target, retries=0) as g, ThreadPoolExecutor(1) as pool:
        long_call = busy.hold(pool, g)
        for _ in range(4):
            with pytest.raises(grpc.RpcError) as err:
                g.stub.Search(search_request("g", embeddings=busy.vecs[:1]), timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The caller's clock runs out a moment before the server's: go on only once the server has
        # dropped the expired calls (or the freed thread may take the last of them).
        _wait_for_gallery_calls(s, 1)
        given_up = g.stub.Search.future(search_request("g", embeddings=busy.vecs[:1]), timeout=30)
        while s.metrics.value("reid_gallery_calls") < 2:
            time.sleep(0.01)
        given_up.cancel()  # a caller that cancels is dropped the same way
        _wait_for_gallery_calls(s, 1)
        busy.release.set()
        assert len(long_call.result(timeout=30)) == 3
        assert len(g.search("g", embeddings=busy.vecs[:2])) == 2
    assert busy.searched == [3, 2]  # the four expired searches never reached the store
    metrics = busy.thread.server.metrics
    assert metrics.value("reid_requests_total", method="Search", code="DEADLINE_EXCEEDED") == 4
    assert metrics.value("reid_requests_total", method="Search", code="CANCELLED") == 1


def test_gallery_calls_beyond_the_queue_capacity_fail_fast_with_resource_exhausted(tiny_onnx, tmp_path):
    """Like a full embedding queue: callers without deadlines used to queue without bound behind
    busy gallery threads; the calls already queued still finish."""
    busy = _BusyGalleryThread(tiny_onnx, tmp_path, gallery_queue_capacity=2)
    with busy as s, GalleryClient(s.target, retries=0) as g, ThreadPoolExecutor(2) as pool:
        running = busy.hold(pool, g)
        waiting = pool.submit(g.search, "g", embeddings=busy.vecs[:2])
        while s.metrics.value("reid_gallery_calls") < 2:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            g.info("g")
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--gallery-queue-capacity" in err.value.details()
        assert time.monotonic() - started < 5  # at once, not after the busy call
        busy.release.set()
        assert (len(running.result(timeout=30)), len(waiting.result(timeout=30))) == (3, 2)
        assert g.info("g").size == 10  # room again
        assert s.metrics.value("reid_gallery_calls") == 0


def test_a_rerank_lambda_of_zero_is_honoured_not_taken_for_unset(server):
    """Proto3 sent no zero, so lambda_value 0 (the Jaccard distance alone) became the default 0.3;
    the field now carries presence."""
    from retrieval.rerank import k_reciprocal_rerank

    rng = np.random.default_rng(8)
    centres = rng.normal(size=(6, 32))
    vecs = (centres[rng.integers(0, 6, 40)] + rng.normal(size=(40, 32)) * 0.5).astype(np.float32)
    with GalleryClient(server.target) as g:
        g.create("g")
        ids = g.add("g", embeddings=vecs[1:])
        for lam in (0.0, 0.3):
            (answer,) = g.search("g", embeddings=vecs[:1], top_k=39, rerank={"k1": 5, "k2": 2, "pool": 39, "lambda_value": lam})
            offline = k_reciprocal_rerank(l2_normalize(vecs[:1]), l2_normalize(vecs[1:]), 5, 2, lam)[0]
            got = dict((h.id, h.distance) for h in answer.hits)
            np.testing.assert_allclose([got[i] for i in ids], offline, atol=1e-5)


def _embeddings(*lengths: int) -> list:
    return [reid_pb2.Embedding(values=[1.0] * n) for n in lengths]


@pytest.mark.parametrize("rpc, request_fields, says", [
    ("AddToGallery", {}, "give either images or embeddings (exactly one)"),
    ("AddToGallery", {"embeddings": _embeddings(32, 32), "ids": [1]}, "2 entries need 2 metadata and 2 ids (or none), got 0 and 1"),
    ("AddToGallery", {"embeddings": _embeddings(32, 31)}, "embeddings have mismatched lengths [31, 32]"),
    ("AddToGallery", {"embeddings": _embeddings(32), "ids": [2**63]}, "ids must be below 2^63"),
    ("Search", {}, "give query images, query embeddings or query entry_ids (exactly one)"),
    ("Search", {"embeddings": _embeddings(32, 31)}, "embeddings have mismatched lengths [31, 32]"),
    ("Search", {"embeddings": _embeddings(32, 32, 32), "filters": [reid_pb2.SearchFilter()] * 2},
     "give no filter, one, or one per query (3); got 2"),
    ("Search", {"embeddings": _embeddings(32), "rerank": reid_pb2.RerankOptions(enabled=True, lambda_value=1.5)},
     "rerank.lambda_value must be within 0..1"),
    ("Search", {"entry_ids": [2**63]}, "entry ids must be below 2^63"),
    ("Search", {"embeddings": _embeddings(32) * 5}, "5 queries; the limit is 4"),
    ("RemoveFromGallery", {"ids": [1], "person_ids": ["p"]}, "give one of ids, person_ids and before_timestamp"),
])
def test_malformed_gallery_requests_are_refused_with_what_to_fix(tiny_onnx, tmp_path, rpc, request_fields, says):
    """Each refused before the store is touched; the gallery and the server go on."""
    from serving.proto import reid_pb2_grpc
    from serving.service import Limits

    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, limits=Limits(max_search_queries=4)))
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    with thread as s, GalleryClient(s.target) as g:
        g.create("g")
        g.add("g", embeddings=np.eye(4, 32, dtype=np.float32), ids=[1, 2, 3, 4])
        message = getattr(reid_pb2, f"{rpc}Request")(gallery="g", **request_fields)
        with pytest.raises(grpc.RpcError) as err:
            getattr(reid_pb2_grpc.ReIdentificationStub(g.channel), rpc)(message, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details() == says
        assert g.info("g").size == 4 and g.search("g", embeddings=np.eye(1, 32), top_k=1)[0].hits[0].id == 1


def test_a_re_ranked_search_whose_caller_gave_up_stops_at_the_next_query(tiny_onnx, tmp_path, monkeypatch):
    """The gallery thread ran a search to its end for a caller long gone (a joint re-ranked search
    of 64 queries over 100,000 entries: 43 s), keeping everyone else's searches waiting."""
    import threading

    import retrieval.gallery.pool_rerank as pool_rerank

    real, reranked, release = pool_rerank.k_reciprocal_rerank, [], threading.Event()

    def slow_first(*args, **kwargs):
        reranked.append(1)
        if len(reranked) == 1:
            release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(pool_rerank, "k_reciprocal_rerank", slow_first)
    vecs = np.random.default_rng(0).normal(size=(40, 32)).astype(np.float32)
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0, gallery_threads=1))
    thread.server.store = FaissGalleryStore(tmp_path / "galleries")
    with thread as s, GalleryClient(s.target, retries=0) as g:
        g.create("g")
        g.add("g", embeddings=vecs)
        from serving.client import search_request

        with pytest.raises(grpc.RpcError) as err:
            g.stub.Search(search_request("g", embeddings=vecs[:5], top_k=3, rerank={}), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        end = time.monotonic() + 10
        while s.metrics.value("reid_gallery_calls") > 0 and time.monotonic() < end:  # the server saw it go
            time.sleep(0.01)
        release.set()
        assert len(g.search("g", embeddings=vecs[:1], top_k=3)[0].hits) == 3  # after the thread is free again
    assert len(reranked) == 1  # queries 2-5 were never re-ranked


def test_evaluate_through_a_server_that_is_not_there_is_one_line(synthetic_root, tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = quick_overrides(synthetic_root, tmp_path)
    assert reid_main(["evaluate", *overrides, f"evaluate.server=127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"reid evaluate: error: server 127.0.0.1:{port}: UNAVAILABLE" in err.strip().splitlines()[-1]
    # on a line of its own: the progress bar it broke off is cleared first ("\r"), not left in front of it
    assert re.search(r"(^|[\r\n])reid evaluate: error: ", err), err


def test_a_call_that_fails_unexpectedly_is_counted_as_unknown(tiny_onnx, tmp_path, monkeypatch):
    """A bug (an exception no handler expected) ends the call with UNKNOWN and gRPC's traceback in
    the log, but reid_requests_total and reid_errors_total did not count it: the errors an alert
    most needs to see went unseen."""
    import serving.service
    from serving.client import ReidClient, build_request
    from serving.proto import reid_pb2_grpc

    store = FaissGalleryStore(tmp_path / "galleries")
    thread = ServerThread(OnnxRuntimeEngine(tiny_onnx), ServerConfig(port=0))
    thread.server.store = store
    with thread as s, GalleryClient(s.target, retries=0) as g, ReidClient(s.target, retries=0) as client:
        g.create("g", 32)

        def bug(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(store, "search", bug)
        monkeypatch.setattr(serving.service, "prepare", bug)
        for call in (lambda: g.search("g", embeddings=np.ones((1, 32))), lambda: client.embed([b"x"]),
                     lambda: list(reid_pb2_grpc.ReIdentificationStub(client.channel).EmbedStream(
                         iter([build_request([b"x"])]), timeout=30))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNKNOWN and "a bug" in err.value.details()
        deadline = time.monotonic() + 5  # the status reaches the caller before the handler has unwound
        while s.metrics.value("reid_errors_total", code="UNKNOWN") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.metrics.value("reid_errors_total", code="UNKNOWN") == 3
        assert [s.metrics.value("reid_requests_total", method=m, code="UNKNOWN")
                for m in ("Search", "Embed", "EmbedStream")] == [1, 1, 1]
