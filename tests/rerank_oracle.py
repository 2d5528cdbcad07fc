"""Dense k-reciprocal re-ranking, written straight from the paper (Zhong et al., CVPR 2017).

The test oracle and benchmark baseline for ``retrieval.rerank``: every matrix is N x N
(N = queries + gallery), as in the implementation most ReID toolboxes copy, so its memory grows
with N^2. Not for production use.
"""
from __future__ import annotations

import numpy as np


def dense_rerank(query: np.ndarray, gallery: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> np.ndarray:
    feats = np.concatenate([query, gallery]).astype(np.float32)
    nq, n = len(query), len(feats)
    sq = (feats * feats).sum(axis=1)
    dist = sq[:, None] + sq[None, :] - 2.0 * feats @ feats.T
    # Divide every distance by its column's maximum; rows of the transpose are then used.
    dist = np.ascontiguousarray((dist / dist.max(axis=0)).T)
    rank = np.argsort(dist, axis=1, kind="stable").astype(np.int32)
    kh = int(np.around(k1 / 2))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[(backward == i).any(axis=1)]

    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = r
        for c in r:
            rc = reciprocal(int(c), kh)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    # Jaccard over shared columns (the inverted index keeps this from being n^3).
    vt = np.ascontiguousarray(v.T)  # column k of v as a contiguous row
    inverted = [np.flatnonzero(vt[k]) for k in range(n)]
    jaccard = np.zeros((nq, n), dtype=np.float32)
    for i in range(nq):
        shared = np.zeros(n, dtype=np.float32)
        for k in np.flatnonzero(v[i]):
            rows = inverted[k]
            shared[rows] += np.minimum(v[i, k], vt[k, rows])
        union = v[i].sum() + v.sum(axis=1) - shared
        jaccard[i] = 1.0 - shared / union
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[:nq]
    return final[:, nq:]
