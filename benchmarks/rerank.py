"""Dense re-ranking oracle vs ``retrieval.rerank`` at Market-1501 scale: time, peak memory, agreement.

Each method runs in a fresh process so its peak RSS is its own. Features are clustered synthetic
ones (751 identities) so the rankings are meaningful. ``--devices`` runs ``retrieval.rerank`` on each
device named (its ``device`` argument: "cpu" is numpy + FAISS, "cuda" the torch path on a GPU),
and every row is compared with the oracle, or with the first device's row when the oracle is skipped.
Usage:
    python benchmarks/rerank.py                    # 3,368 x 19,732 at 256-d and 1024-d
    python benchmarks/rerank.py --dims 256 --gallery 100000 --skip-oracle
    python benchmarks/rerank.py --dims 256 --skip-oracle --devices cpu cuda
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_problem(nq: int, ng: int, dim: int, ids: int = 751, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    q_cams, g_cams = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    # Hard enough that mAP is well below 1, so agreement of the metrics means something. Both the
    # distance between two centers and the noise grow with sqrt(dim), so one level suits every width.
    noise = 2.0
    q = centers[q_pids] + rng.normal(size=(nq, dim)).astype(np.float32) * noise
    g = centers[g_pids] + rng.normal(size=(ng, dim)).astype(np.float32) * noise
    return q, g, q_pids, g_pids, q_cams, g_cams


def _run(method: str, args: tuple, out: mp.Queue) -> None:
    q, g = make_problem(*args)[:2]
    if method == "oracle":
        from tests.rerank_oracle import dense_rerank as rerank
    else:
        from retrieval.rerank import k_reciprocal_rerank

        def rerank(q, g):
            return k_reciprocal_rerank(q, g, device=method)

        rerank(q[:8], g[:64])  # outside the timing: loads torch and starts CUDA for a GPU device
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    dist = rerank(q, g)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    path = Path(f"/tmp/rerank_{method}_{args[2]}_{args[1]}.npy")
    np.save(path, dist)
    out.put((seconds, peak / 2**20, max(peak - base, 0) / 2**20, str(path)))


def measure(method: str, args: tuple):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, args, out))
    proc.start()
    result = out.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=19732)
    p.add_argument("--dims", type=int, nargs="*", default=[256, 1024])
    p.add_argument("--skip-oracle", action="store_true")
    p.add_argument("--devices", nargs="+", default=["cpu"], help="re-ranking devices to time (cpu, cuda, cuda:1, ...)")
    a = p.parse_args()
    from retrieval.metrics import evaluate_rank

    print(f"problem: {a.queries} queries x {a.gallery} gallery, clustered synthetic features")
    for dim in a.dims:
        args = (a.queries, a.gallery, dim)
        _, _, qp, gp, qc, gc = make_problem(*args)
        rows = {}
        for method in ([] if a.skip_oracle else ["oracle"]) + a.devices:
            seconds, peak_gb, delta_gb, path = measure(method, args)
            cmc, m_ap = evaluate_rank(np.load(path), qp, gp, qc, gc)
            rows[method] = (seconds, peak_gb, path, cmc, m_ap)
            print(f"  {dim:5d}-d {method:10s} {seconds:8.2f} s  peak RSS {peak_gb:6.2f} GiB (+{delta_gb:.2f} re-ranking)  mAP {m_ap:.6f}  rank-1 {cmc[0]:.6f}")
        (base, (t0, m0, p0, c0, a0)), *others = rows.items()
        for method, (t1, m1, p1, c1, a1) in others:
            diff = np.abs(np.load(p0) - np.load(p1)).max()
            print(f"  {dim:5d}-d {method} against {base}: speed-up {t0 / t1:.1f}x, memory {m1 / m0:.3f}; "
                  f"max |distance diff| {diff:.2e}; mAP diff {abs(a0 - a1):.2e}; max CMC diff {np.abs(c0 - c1).max():.2e}")


if __name__ == "__main__":
    main()
