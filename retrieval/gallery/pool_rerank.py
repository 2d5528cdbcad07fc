"""Re-ranked gallery search over a bounded candidate pool, for any backend.

A query's pool is its top ``pool`` hits (filters applied) plus the ``k1`` nearest neighbours of
those candidates, so each candidate's reciprocal neighbourhood is present; k-reciprocal re-ranking
then runs on the query and its pool alone. Its cost depends on ``pool`` and ``k1``, not on the
gallery size, and grows linearly with the queries of a call; when the pool covers the gallery the
result equals offline re-ranking of that query.

With ``joint`` the call's queries are re-ranked together over the union of their pools, as
offline evaluation re-ranks a query set: each query then takes part in the others'
neighbourhoods, so an answer depends on what else the call asked, and the pool (hence the cost,
quadratic in it) grows with the number of queries. ``reid evaluate evaluate.server=`` asks for it
so that served and offline figures agree.

A backend without one lock over search and fetch (Milvus, shared by replicas) may lose a
candidate between the two reads: another replica removed it. The fetch then leaves it out and
the search goes on without it, as if it had been removed first.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from retrieval.cancellation import check_cancelled
from retrieval.gallery.base import EntryMetadata, Hit, InvalidEntry, RerankOptions, SearchFilter
from retrieval.gallery.grouping import best_per_person
from retrieval.rerank import k_reciprocal_rerank

# (queries, k, per-query filters) -> (scores, ids) with -1 for missing hits
SearchFn = Callable[[np.ndarray, int, list], tuple]
# ids -> (the ids still present, in the given order; their L2-normalized vectors; their metadata)
FetchFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray, list[EntryMetadata]]"]


def rerank_items(n_queries: int, pool: int, opts: RerankOptions, live: int) -> int:
    """The most gallery items a re-ranked search may gather: each query's ``pool`` and its
    candidates' neighbours, pool x (k1 + 1) (at most the gallery), summed over the queries; with
    ``joint`` their union (at most the gallery), which is what each of them is re-ranked with."""
    if opts.joint:
        return min(live, n_queries * pool * (opts.k1 + 1))
    return n_queries * min(live, pool * (opts.k1 + 1))


def pool_rerank(queries: np.ndarray, top_k: int, filters: list[SearchFilter], opts: RerankOptions, live: int,
                search: SearchFn, fetch: FetchFn, group_by_person: bool = False) -> list[list[Hit]]:
    """Each query's top_k re-ranked hits; with ``group_by_person``, the best entry of each of top_k
    people among the pool's first ``pool`` re-ranked hits."""
    pool = min(max(opts.pool, top_k), live)
    items = rerank_items(len(queries), pool, opts, live)
    if opts.max_items is not None and items > opts.max_items:
        raise InvalidEntry(f"re-ranking would gather up to {items:,} gallery items ({len(queries)} quer"
                           f"{'y' if len(queries) == 1 else 'ies'}, pool {max(opts.pool, top_k)}, k1 {opts.k1}"
                           f"{', joint' if opts.joint else ''}); the server's limit is {opts.max_items:,} "
                           f"(max_rerank_items): send fewer queries per call, or lower pool, top_k or k1")
    _, first = search(queries, pool, filters)
    cand = np.unique(first[first >= 0])
    neighbours: dict[int, np.ndarray] = {}
    short = len(cand) < live if opts.joint else (first >= 0).sum(axis=1).min() < live
    if len(cand) and short:  # a pool leaves entries out: bring in its candidates' neighbourhoods
        cand, vectors, _ = fetch(cand)
        if len(cand):
            _, neigh = search(vectors, min(opts.k1 + 1, live), [SearchFilter()] * len(cand))
            neighbours = {i: row[row >= 0] for i, row in zip(cand.tolist(), neigh)}
    none = np.zeros(0, dtype=np.int64)
    pools = [np.unique(np.concatenate([row[row >= 0], *(neighbours.get(i, none) for i in row[row >= 0].tolist())]))
             for row in first]
    everyone = np.unique(np.concatenate(pools))
    if not len(everyone):  # the filters leave nothing
        return [[] for _ in queries]
    ids, gallery, meta = fetch(everyone)  # ascending ids, those still present: rows of the joint pool
    if opts.joint:
        pools = [np.arange(len(ids))] * len(queries)
        if len(ids):
            dist = k_reciprocal_rerank(queries, gallery, opts.k1, opts.k2, opts.lambda_value)
    else:
        pools = [np.searchsorted(ids, pool_ids[np.isin(pool_ids, ids)]) for pool_ids in pools]
    out = []
    for qi, (flt, members) in enumerate(zip(filters, pools)):
        check_cancelled()
        if not len(members):  # the filters leave nothing (or everything was removed meanwhile)
            out.append([])
            continue
        vectors = gallery[members]
        d = dist[qi] if opts.joint else k_reciprocal_rerank(queries[qi:qi + 1], vectors, opts.k1, opts.k2,
                                                             opts.lambda_value)[0]
        allowed = np.array([flt.matches(meta[m]) for m in members], dtype=bool)
        d = np.where(allowed, d, np.inf)
        order = np.argsort(d, kind="stable")[: min(pool if group_by_person else top_k, int(allowed.sum()))]
        cos = vectors[order] @ queries[qi]
        hits = [Hit(int(ids[members[j]]), float(c), float(d[j]), meta[members[j]]) for j, c in zip(order, cos)]
        out.append(best_per_person(hits, top_k) if group_by_person else hits)
    return out
