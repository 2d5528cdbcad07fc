"""Time of ``evaluate_rank`` at Market-1501 scale (3,368 x 19,732), on random and on clustered distances.

Goal: under 1 s on a 2-core machine. Usage: python benchmarks/evaluate_rank.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.distance import cosine_distance  # noqa: E402
from retrieval.metrics import evaluate_rank  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    nq, ng, ids = 3368, 19732, 751
    q_pids, g_pids = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    q_cams, g_cams = rng.integers(0, 6, nq), rng.integers(0, 6, ng)
    centers = rng.normal(size=(ids, 256)).astype(np.float32)
    cases = {
        "clustered (a useful model)": cosine_distance(centers[q_pids] + rng.normal(size=(nq, 256)).astype(np.float32) * 2.0,
                                                      centers[g_pids] + rng.normal(size=(ng, 256)).astype(np.float32) * 2.0),
        "random (worst case)": rng.random((nq, ng), dtype=np.float32),
    }
    for name, dist in cases.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            cmc, m_ap = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
            times.append(time.perf_counter() - start)
        print(f"{name:28s} best {min(times):.3f} s, median {np.median(times):.3f} s  (mAP {m_ap:.4f}, rank-1 {cmc[0]:.4f})")


if __name__ == "__main__":
    main()
