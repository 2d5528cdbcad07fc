"""Re-ranked gallery search over a bounded candidate pool, for any backend.

The pool is each query's top ``pool`` hits (filters applied) plus the ``k1`` nearest neighbours
of those candidates, so each candidate's reciprocal neighbourhood is present; k-reciprocal
re-ranking then runs on queries x pool. Its cost depends on ``pool`` and ``k1``, not on the
gallery size; when the pool covers the gallery the result equals offline re-ranking.

A backend without one lock over search and fetch (Milvus, shared by replicas) may lose a
candidate between the two reads: another replica removed it. The fetch then leaves it out and
the search goes on without it, as if it had been removed first.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from retrieval.gallery.base import EntryMetadata, Hit, RerankOptions, SearchFilter
from retrieval.gallery.grouping import best_per_person
from retrieval.rerank import k_reciprocal_rerank

# (queries, k, per-query filters) -> (scores, ids) with -1 for missing hits
SearchFn = Callable[[np.ndarray, int, list], tuple]
# ids -> (the ids still present, in the given order; their L2-normalized vectors; their metadata)
FetchFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray, list[EntryMetadata]]"]


def pool_rerank(queries: np.ndarray, top_k: int, filters: list[SearchFilter], opts: RerankOptions, live: int,
                search: SearchFn, fetch: FetchFn, group_by_person: bool = False) -> list[list[Hit]]:
    """Each query's top_k re-ranked hits; with ``group_by_person``, the best entry of each of top_k
    people among the pool's first ``pool`` re-ranked hits."""
    pool = min(max(opts.pool, top_k), live)
    _, first = search(queries, pool, filters)
    cand = np.unique(first[first >= 0])
    if len(cand) and len(cand) < live:
        cand, vectors, _ = fetch(cand)
        if len(cand):
            _, neigh = search(vectors, min(opts.k1 + 1, live), [SearchFilter()] * len(cand))
            cand = np.unique(np.concatenate([cand, neigh[neigh >= 0]]))
    if len(cand):
        cand, gallery, meta = fetch(cand)
    if not len(cand):  # the filters leave nothing (or everything was removed meanwhile)
        return [[] for _ in queries]
    dist = k_reciprocal_rerank(queries, gallery, opts.k1, opts.k2, opts.lambda_value)
    cos = queries @ gallery.T
    out = []
    for qi, flt in enumerate(filters):
        allowed = np.array([flt.matches(m) for m in meta], dtype=bool)
        d = np.where(allowed, dist[qi], np.inf)
        order = np.argsort(d, kind="stable")[: min(pool if group_by_person else top_k, int(allowed.sum()))]
        hits = [Hit(int(cand[j]), float(cos[qi, j]), float(d[j]), meta[j]) for j in order]
        out.append(best_per_person(hits, top_k) if group_by_person else hits)
    return out
