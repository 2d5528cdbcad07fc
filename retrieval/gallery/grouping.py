"""One hit per person: "who is this?" answered with distinct people, for any backend.

A gallery holds many entries of each person (every crop a tracker enrolled), so the plain top-k
of a query of a well-seen person is that person k times, and the second candidate never shows.
Grouped search keeps each person's best entry (an entry without a ``person_id`` stands alone)
and widens its search until it has ``top_k`` people or has seen every entry the filters allow.
"""
from __future__ import annotations

from typing import Callable

from retrieval.cancellation import check_cancelled
from retrieval.gallery.base import Hit

# Hits fetched per person wanted in the first round, and the factor each later round widens by.
GROUP_FETCH = 4
# Hits one search of a round may hold: the queries still short of people go in groups of at most
# this many hits. A gallery of few people with many entries each widens a round to every entry,
# and 64 such queries over a million entries held 64 million hits (about 20 GB) at once.
ROUND_HITS = 1_000_000

# (the query rows still short of people, k) -> each of those queries' top-k hits, best first
HitsFn = Callable[[list[int], int], list[list[Hit]]]


def best_per_person(hits: list[Hit], top_k: int) -> list[Hit]:
    """The first (best) hit of each person in ``hits``, in their order, at most ``top_k``."""
    seen: set[tuple] = set()
    out: list[Hit] = []
    for hit in hits:
        key = ("person", hit.metadata.person_id) if hit.metadata.person_id else ("entry", hit.id)
        if key not in seen:
            seen.add(key)
            out.append(hit)
            if len(out) == top_k:
                break
    return out


def search_by_person(search: HitsFn, n_queries: int, top_k: int, cap: int) -> list[list[Hit]]:
    """Each query's best entries of ``top_k`` distinct people. ``cap`` is the most hits one search
    may return (the gallery's live entries, or a backend's own limit): a query whose search
    returned fewer than it asked for has seen every entry its filter allows."""
    out: list[list[Hit]] = [[] for _ in range(n_queries)]
    pending = list(range(n_queries))
    k = min(cap, top_k * GROUP_FETCH)
    while pending and k > 0:
        short = []
        step = max(1, ROUND_HITS // k)
        for start in range(0, len(pending), step):
            check_cancelled()
            rows = pending[start:start + step]
            for row, hits in zip(rows, search(rows, k)):
                out[row] = best_per_person(hits, top_k)
                if len(out[row]) < top_k and len(hits) >= k and k < cap:
                    short.append(row)
        pending, k = short, min(cap, k * GROUP_FETCH)
    return out
