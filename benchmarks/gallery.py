"""Gallery figures: add throughput, search latency (p50/p99 for 1 and 64 queries), HNSW recall@10,
server vs in-process, FAISS vs Milvus (Lite, or a server with --milvus-uri), memory per million
entries (512-d), concurrent and filtered searches, how long an HNSW gallery takes to snapshot and start again,
plain against grouped search by person, re-ranked search (each query alone or joint), and how soon
a server's gallery thread is free again after the caller of a long search gives up.

Usage: python benchmarks/gallery.py [--sizes 10000 100000 1000000] [--milvus-sizes 10000 100000] [--server-size 100000]
                                    [--milvus-uri http://host:19530] [--milvus-consistency strong] [--by-person-size 100000]
                                    [--list-size 1000000] [--rerank-size 100000] [--abandon-size 30000]
HNSW is built up to 100k entries (building it for 1M takes far longer than the rest on 2 cores).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.gallery import EntryMetadata, FaissGalleryStore, RerankOptions, SearchFilter  # noqa: E402
from retrieval.gallery.milvus_store import CONSISTENCY_LEVELS  # noqa: E402

DIM = 512


IDS_PER_MILLION = 100_000
_CENTERS = np.random.default_rng(123).normal(size=(IDS_PER_MILLION, DIM)).astype(np.float32)


def data(n: int, seed: int = 0) -> np.ndarray:
    """Clustered like real embeddings: about 10 entries per identity around the identity's center
    (uniform random 512-d vectors are HNSW's worst case and unlike any ReID gallery)."""
    rng = np.random.default_rng(seed)
    centers = _CENTERS[rng.integers(0, max(1, min(IDS_PER_MILLION, n // 10)), n)]
    return centers + rng.normal(size=(n, DIM)).astype(np.float32) * 0.6


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


def timed_search(search, queries: np.ndarray, reps: int) -> tuple[float, float]:
    lat = []
    for r in range(reps):
        start = time.perf_counter()
        search(queries)
        lat.append(time.perf_counter() - start)
    return float(np.percentile(lat, 50) * 1000), float(np.percentile(lat, 99) * 1000)


def fill(store, name: str, vecs: np.ndarray, chunk: int = 10_000) -> float:
    meta = [EntryMetadata(camera_id=f"c{i % 6}", labels={"site": "ab"[i % 2]}) for i in range(chunk)]
    start = time.perf_counter()
    for s in range(0, len(vecs), chunk):
        part = vecs[s:s + chunk]
        store.add(name, np.arange(s + 1, s + len(part) + 1), part, meta[: len(part)])
    return len(vecs) / (time.perf_counter() - start)


def report(label: str, store, name: str, vecs: np.ndarray, exact=None) -> dict:
    q1, q64 = data(1, seed=7), data(64, seed=8)
    out = {}
    for nq, q in ((1, q1), (64, q64)):
        p50, p99 = timed_search(lambda x: store.search(name, x, 10, [SearchFilter()]), q, reps=20 if len(vecs) <= 100_000 else 5)
        out[nq] = (p50, p99)
    line = (f"  {label:26s} search 1 query p50 {out[1][0]:7.2f} ms p99 {out[1][1]:7.2f} ms | "
            f"64 queries p50 {out[64][0]:8.2f} ms p99 {out[64][1]:8.2f} ms")
    if exact is not None:
        approx = store.search(name, q64, 10, [SearchFilter()])
        truth = exact.search("flat", q64, 10, [SearchFilter()])
        recall = np.mean([len({h.id for h in a} & {h.id for h in t}) / 10 for a, t in zip(approx, truth)])
        line += f" | recall@10 {recall:.3f}"
    print(line)
    return out


def concurrent(label: str, store, name: str, seconds: float = 3.0) -> None:
    """Single-query searches a second from 1, 2 and 4 threads at once on one gallery."""
    queries = data(256, seed=11)
    rates = []
    for threads in (1, 2, 4):
        done, stop = [0] * threads, time.perf_counter() + seconds

        def work(slot: int) -> None:
            while time.perf_counter() < stop:
                store.search(name, queries[(slot * 97 + done[slot]) % 256][None], 10, [SearchFilter()])
                done[slot] += 1

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rates.append(sum(done) / (time.perf_counter() - start))
    print(f"  {label:26s} single-query searches/s with 1 / 2 / 4 threads: " + " / ".join(f"{r:,.0f}" for r in rates))


def filtered(label: str, store, name: str, remove_one: bool = False) -> None:
    """p50 of one query with a camera filter, a label filter, and with ``remove_one`` (last: it
    changes the gallery) without a filter once one entry is removed; and of 64 queries with a
    camera filter."""
    query = data(1, seed=12)
    cases = {"no filter": SearchFilter(), "exclude a camera": SearchFilter(exclude_camera_id="c1"),
             "one label": SearchFilter(labels={"site": "a"})}
    p50 = {what: timed_search(lambda x: store.search(name, x, 10, [flt]), query, 30)[0] for what, flt in cases.items()}
    p50["64 queries excluding a camera"] = timed_search(
        lambda x: store.search(name, x, 10, [SearchFilter(exclude_camera_id="c1")]), data(64, seed=13), 5)[0]
    if remove_one:
        store.remove(name, np.array([5]))
        p50["one entry removed"] = timed_search(lambda x: store.search(name, x, 10, [SearchFilter()]), query, 30)[0]
    print(f"  {label:26s} p50 (1 query unless said): " + ", ".join(f"{what} {ms:.2f} ms" for what, ms in p50.items()))


def during_snapshot(label: str, store: FaissGalleryStore, name: str) -> None:
    """A snapshot with a search thread and an add thread running: how long it took, and the
    longest wait of a search and of an add (10 entries) while it ran. It adds entries: run it
    after the gallery's other figures."""
    searches, adds, stop = [], [], threading.Event()
    query, extra = data(1, seed=14), data(10, seed=15)

    def loop(call, waits):
        while not stop.is_set():
            start = time.perf_counter()
            call()
            waits.append((start, time.perf_counter() - start))
            time.sleep(0.01)

    workers = [threading.Thread(target=loop, args=(lambda: store.search(name, query, 10, [SearchFilter()]), searches)),
               threading.Thread(target=loop, args=(lambda: store.add(name, np.zeros(10, np.int64), extra,
                                                                      [EntryMetadata(camera_id="c9")] * 10), adds))]
    for w in workers:
        w.start()
    time.sleep(0.5)
    began = time.perf_counter()
    store.snapshot(name)
    took = time.perf_counter() - began
    time.sleep(0.2)
    stop.set()
    for w in workers:
        w.join()

    def longest(waits):  # calls that overlapped the snapshot
        during = [w for s, w in waits if s + w >= began and s <= began + took]
        return f"{len(during)}, longest {max(during) * 1000:.0f} ms" if during else "none"
    print(f"  {label:26s} snapshot beside a search and an add thread: {took:.2f} s; searches during it {longest(searches)}; "
          f"adds {longest(adds)}")


def restart(store: FaissGalleryStore, root: Path) -> None:
    """Snapshot (which saves the HNSW graph), then time a restart that reads it back."""
    start = time.perf_counter()
    store.snapshot("hnsw")
    saved = time.perf_counter() - start
    queries = data(64, seed=8)
    answers = [[h.id for h in row] for row in store.search("hnsw", queries, 10, [SearchFilter()])]
    store.close()
    start = time.perf_counter()
    reopened = FaissGalleryStore(root)
    loaded = time.perf_counter() - start
    same = [[h.id for h in row] for row in reopened.search("hnsw", queries, 10, [SearchFilter()])] == answers
    size = sum(f.stat().st_size for f in (root / "hnsw").iterdir()) / 2**20
    print(f"  faiss hnsw restart: snapshot with graph {saved:.2f} s ({size:.0f} MiB on disk), start {loaded:.2f} s, "
          f"same answers: {same}")
    reopened.close()


def server_vs_direct(size: int, tmp: Path) -> None:
    from loadgen import stop_server
    from serving.client import GalleryClient

    proc, target = _serve(tmp)
    try:
        vecs = data(size)
        with GalleryClient(target) as g:
            g.create("bench", dimension=DIM)
            start = time.perf_counter()
            for s in range(0, size, 5000):
                g.add("bench", embeddings=vecs[s:s + 5000], ids=range(s + 1, min(s + 5000, size) + 1))
            add_rate = size / (time.perf_counter() - start)
            served = {nq: timed_search(lambda x: g.search("bench", embeddings=x, top_k=10), data(nq, 9), 20) for nq in (1, 64)}
        direct_store = FaissGalleryStore(tmp / "direct")
        direct_store.create("bench", DIM)
        fill(direct_store, "bench", vecs)
        direct = {nq: timed_search(lambda x: direct_store.search("bench", x, 10, [SearchFilter()]), data(nq, 9), 20) for nq in (1, 64)}
        print(f"server vs in-process at {size:,} (flat): adds over gRPC {add_rate:,.0f} entries/s")
        for nq in (1, 64):
            print(f"  {nq:2d} queries: server p50 {served[nq][0]:.2f} ms vs direct {direct[nq][0]:.2f} ms "
                  f"(+{(served[nq][0] / direct[nq][0] - 1) * 100:.0f}%), p99 {served[nq][1]:.2f} vs {direct[nq][1]:.2f} ms")
    finally:
        stop_server(proc)


def _serve(tmp: Path, *extra: str):
    """A reid-serve process with a stub model (the benchmarks send embeddings): (process, target)."""
    import os
    import subprocess

    from serving.healthcheck import wait_serving

    onnx_stub = tmp / "model.onnx"
    if not onnx_stub.exists():
        _tiny_onnx(onnx_stub)
    port = 50000 + (os.getpid() + len(extra)) % 10000
    proc = subprocess.Popen([sys.executable, "-c", "from serving.cli import serve_main; raise SystemExit(serve_main())",
                             "--model", str(onnx_stub), "--port", str(port), "--gallery-dir", str(tmp / f"srv{port}"),
                             *extra], cwd=Path(__file__).resolve().parents[1], stderr=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    if not wait_serving(target, 120):
        proc.kill()
        raise RuntimeError("the server did not start")
    return proc, target


def abandoned(size: int, tmp: Path, queries: int = 64) -> None:
    """A joint re-ranked search of ``queries`` queries whose caller gives up after 1 s, on a server
    with one gallery thread: how long a plain search sent then waits for that thread."""
    import grpc

    from loadgen import stop_server
    from serving.client import GalleryClient, search_request

    proc, target = _serve(tmp, "--gallery-threads", "1")
    try:
        vecs = data(size, seed=4)
        with GalleryClient(target, retries=0, timeout=600) as g:
            g.create("g", dimension=DIM)
            for s in range(0, size, 5000):
                g.add("g", embeddings=vecs[s:s + 5000])
            long_search = search_request("g", embeddings=vecs[:queries] + 0.1, top_k=10, rerank={"joint": True})
            start = time.perf_counter()
            g.stub.Search(long_search, timeout=600)
            whole = time.perf_counter() - start
            start = time.perf_counter()
            try:
                g.stub.Search(long_search, timeout=1.0)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
            g.search("g", embeddings=vecs[:1], top_k=10)
            after = time.perf_counter() - start
        print(f"a caller giving up at {size:,} entries (flat, one gallery thread): a joint re-ranked search of {queries} "
              f"queries takes {whole:.1f} s; given up at 1 s, the next plain search was answered {after:.1f} s after it began")
    finally:
        stop_server(proc)


def by_person(size: int, per_person: int, tmp: Path) -> None:
    """Plain against grouped search (``group_by_person``) on a flat gallery where each person has
    ``per_person`` entries close together: the plain top 10 is then one person."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(size // per_person, DIM)).astype(np.float32)
    vecs = np.repeat(centres, per_person, axis=0) + rng.normal(size=(size, DIM)).astype(np.float32) * 0.3
    store = FaissGalleryStore(tmp / "by_person", snapshot_every=10**9)
    store.create("g", DIM)
    for s in range(0, size, 10_000):
        part = vecs[s:s + 10_000]
        store.add("g", np.arange(s + 1, s + len(part) + 1), part,
                  [EntryMetadata(person_id=str(i // per_person)) for i in range(s, s + len(part))])
    queries = vecs[rng.integers(0, size, 8)] + 0.05
    print(f"search by person at {size:,} (flat, {per_person} entries per person, 8 queries, top_k 10):")
    for grouped in (False, True):
        p50, p99 = timed_search(lambda x: store.search("g", x, 10, [], group_by_person=grouped), queries, 10)
        people = np.mean([len({h.metadata.person_id for h in row})
                          for row in store.search("g", queries, 10, [], group_by_person=grouped)])
        print(f"  {'grouped' if grouped else 'plain  '}: p50 {p50:.1f} ms, p99 {p99:.1f} ms; people in the top 10: {people:.1f}")
    store.close()


def reranked(size: int, tmp: Path) -> None:
    """Re-ranked search (k1 20, k2 6, pool 100, top_k 10) on a flat gallery: each query alone (the
    default) against the call's queries re-ranked together (``joint``, what evaluation asks for)."""
    vecs = data(size, seed=3)
    store = FaissGalleryStore(tmp / "reranked", snapshot_every=10**9)
    store.create("g", DIM)
    fill(store, "g", vecs)
    rng = np.random.default_rng(6)
    print(f"re-ranked search at {size:,} (flat, pool 100, k1 20, k2 6, top_k 10):")
    for n_queries in (1, 8, 64):
        queries = vecs[rng.integers(0, size, n_queries)] + rng.normal(size=(n_queries, DIM)).astype(np.float32) * 0.3
        for joint in (False, True):
            opts = RerankOptions(pool=100, joint=joint)
            store.search("g", queries, 10, [], opts)  # warm
            p50, _ = timed_search(lambda x: store.search("g", x, 10, [], opts), queries, 3 if n_queries < 64 else 1)
            print(f"  {n_queries:2d} queries, {'joint       ' if joint else 'each alone  '}: {p50:8.0f} ms "
                  f"({p50 / n_queries:.0f} ms a query)")
    store.close()


def listing(size: int, tmp: Path, dim: int = 64) -> None:
    """ListEntries' store side on a flat gallery (``dim`` small: the listing's cost is in ids and
    metadata, and a million 512-d entries would take 2 GiB for nothing): the first page, one
    person's entries (a scan of every entry's person id), every entry in pages of 10,000."""
    store = FaissGalleryStore(tmp / "listing", snapshot_every=10**9)
    store.create("g", dim)
    rng = np.random.default_rng(6)
    for s in range(0, size, 100_000):
        n = min(100_000, size - s)
        store.add("g", np.zeros(n, np.int64), rng.normal(size=(n, dim)).astype(np.float32),
                  [EntryMetadata(person_id=str(i % (size // 20 or 1))) for i in range(s, s + n)])
    print(f"listing entries at {size:,} (flat, {dim}-d, 20 entries per person; the store alone, no gRPC):")
    for label, call in [("a page of 1,000", lambda: store.entries("g", 0, 1000)),
                        ("one person's 20 entries", lambda: store.entries("g", 0, 1000, ["17"])),
                        ("a page of 1,000 with embeddings", lambda: store.entries("g", 0, 1000, with_vectors=True))]:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        print(f"  {label}: {np.median(times):.1f} ms (median of 5)")
    start, after, pages = time.perf_counter(), 0, 0
    while True:
        page = store.entries("g", after, 10_000)
        pages += 1
        if not page.more:
            break
        after = int(page.ids[-1])
    print(f"  every entry, {pages} pages of 10,000: {time.perf_counter() - start:.2f} s")
    store.close()


def _tiny_onnx(path: Path) -> None:
    """A 512-d model file only so reid-serve can start (the benchmark sends embeddings)."""
    import onnx
    from onnx import TensorProto, helper

    from serving.engines.base import ModelMetadata

    w = helper.make_tensor("w", TensorProto.FLOAT, [3 * 8 * 4, DIM], np.zeros(3 * 8 * 4 * DIM, np.float32))
    shape = helper.make_tensor("s", TensorProto.INT64, [2], np.array([-1, 96], np.int64))
    nodes = [helper.make_node("Reshape", ["images", "s"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["embeddings"])]
    graph = helper.make_graph(nodes, "stub", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["n", 3, 8, 4])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["n", DIM])], [w, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in ModelMetadata(8, 4, DIM).to_props().items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--milvus-sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--server-size", type=int, default=100_000)
    p.add_argument("--milvus-uri", default="",
                   help="a Milvus server (http://host:19530) instead of Milvus Lite; its galleries named "
                        "bench_flat/bench_hnsw are replaced")
    p.add_argument("--milvus-consistency", default="strong", choices=list(CONSISTENCY_LEVELS))
    p.add_argument("--by-person-size", type=int, default=100_000, help="entries for plain vs grouped search (0: skip)")
    p.add_argument("--list-size", type=int, default=1_000_000, help="entries for listing them (ListEntries; 0: skip)")
    p.add_argument("--rerank-size", type=int, default=100_000, help="entries for re-ranked search (0: skip)")
    p.add_argument("--abandon-size", type=int, default=30_000, help="entries for a search whose caller gives up (0: skip)")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    tmp = Path(tempfile.mkdtemp(prefix="gallery-bench-"))
    try:
        for n in args.sizes:
            vecs = data(n)
            print(f"{n:,} entries x {DIM}-d")
            store = FaissGalleryStore(tmp / f"faiss{n}", snapshot_every=10**9)
            store.create("flat", DIM)
            before = _rss_gib()
            rate = fill(store, "flat", vecs)
            grew = _rss_gib() - before
            print(f"  faiss flat: add {rate:,.0f} entries/s (durable: logged + fsync'ed per 10k batch); "
                  f"RSS grew {grew:.2f} GiB ({grew / n * 1e6:.2f} GiB per million)")
            report("faiss flat", store, "flat", vecs)
            concurrent("faiss flat", store, "flat")
            filtered("faiss flat", store, "flat")
            if n <= 100_000:
                hnsw = FaissGalleryStore(tmp / f"hnsw{n}", snapshot_every=10**9)
                hnsw.create("hnsw", DIM, "hnsw")
                before = _rss_gib()
                rate = fill(hnsw, "hnsw", vecs)
                grew = _rss_gib() - before
                print(f"  faiss hnsw: add {rate:,.0f} entries/s; RSS grew {grew:.2f} GiB ({grew / n * 1e6:.2f} GiB per million)")
                report("faiss hnsw (M=32)", hnsw, "hnsw", vecs, exact=store)
                concurrent("faiss hnsw (M=32)", hnsw, "hnsw")
                filtered("faiss hnsw (M=32)", hnsw, "hnsw", remove_one=True)
                during_snapshot("faiss hnsw (M=32)", hnsw, "hnsw")
                restart(hnsw, tmp / f"hnsw{n}")
            if n in args.milvus_sizes:
                try:
                    from retrieval.gallery.milvus_store import MilvusGalleryStore
                except ImportError:
                    print("  milvus: pymilvus not installed (extra 'milvus')")
                else:
                    ms = MilvusGalleryStore(args.milvus_uri or str(tmp / f"milvus{n}.db"), consistency=args.milvus_consistency)
                    kind = f"milvus {'server' if args.milvus_uri else 'lite'} ({args.milvus_consistency})"
                    for index in ("flat", "hnsw"):
                        name = f"bench_{index}"
                        if name in [g.name for g in ms.list()]:
                            ms.drop(name)
                        ms.create(name, DIM, index)
                        print(f"  {kind} {index}: add {fill(ms, name, vecs):,.0f} entries/s (flushed per 10k batch)")
                        report(f"{kind} {index}", ms, name, vecs, exact=store)
                        if args.milvus_uri:
                            ms.drop(name)
                    ms.close()
            during_snapshot("faiss flat", store, "flat")  # last: its adds would count as misses in the recall of the others
            store.close()
            del vecs
        if args.server_size:
            server_vs_direct(args.server_size, tmp)
        if args.by_person_size:
            by_person(args.by_person_size, 20, tmp)
        if args.list_size:
            listing(args.list_size, tmp)
        if args.rerank_size:
            reranked(args.rerank_size, tmp)
        if args.abandon_size:
            abandoned(args.abandon_size, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
