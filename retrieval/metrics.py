"""Market-1501 ranking metrics: CMC, mAP and mINP.

Protocol: for each query, gallery items with the same person id AND the same camera are removed,
and so are junk items (pid -1); queries left without any true match are skipped. Ties in distance
are broken by gallery order (a stable sort), so results are deterministic.

A full argsort of a 3,368 x 19,732 matrix takes seconds; the metrics only need the rank of each
true match, so each query's matches are sorted (a handful) and every other kept gallery item is
bucketed among them with one ``searchsorted``.
"""
from __future__ import annotations

import numpy as np

JUNK_PID = -1


def _match_ranks(dist: np.ndarray, positive: np.ndarray, kept_negative: np.ndarray) -> np.ndarray:
    """1-based ranks, among kept gallery items, of each positive in ascending (distance, index) order.

    Only negatives closer than the farthest positive can push a positive down, so just those are
    sorted; with a useful model that is a small part of the gallery.
    """
    pos_idx = np.flatnonzero(positive)
    pos_d = dist[pos_idx]
    order = np.lexsort((pos_idx, pos_d))
    pos_idx, pos_d = pos_idx[order], pos_d[order]
    close = kept_negative & (dist <= pos_d[-1])
    neg_d = np.sort(dist[close])
    below = np.searchsorted(neg_d, pos_d, side="left")
    tie_count = np.searchsorted(neg_d, pos_d, side="right") - below
    for t in np.flatnonzero(tie_count):
        # Equal distances: a negative with a smaller gallery index ranks first (stable order).
        tied_idx = np.flatnonzero(close & (dist == pos_d[t]))
        below[t] += int(np.count_nonzero(tied_idx < pos_idx[t]))
    return np.arange(1, len(pos_idx) + 1) + below


def queries_with_matches(q_pids, g_pids, q_camids, g_camids) -> np.ndarray:
    """Mask of the queries that the protocol can score: those with a gallery item of the same person
    from another camera (``evaluate_rank`` skips the others). Cheap enough to check a split up front."""
    cams: dict = {}
    for pid, cam in zip(np.asarray(g_pids).tolist(), np.asarray(g_camids).tolist()):
        if pid != JUNK_PID:
            cams.setdefault(pid, set()).add(cam)
    return np.array([bool(cams.get(pid, set()) - {cam})
                     for pid, cam in zip(np.asarray(q_pids).tolist(), np.asarray(q_camids).tolist())], dtype=bool)


def evaluate_rank(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    return_minp: bool = False,
):
    """Return ``(cmc, mAP)`` (or ``(cmc, mAP, mINP)``) for a query x gallery distance matrix.

    ``cmc[k-1]`` is the rank-k accuracy. Raises ``ValueError`` when no query has a valid match, or
    a distance is NaN, since every figure would then be undefined. An infinite distance is valid:
    the item ranks last (evaluation through a server gives it to items a search did not return).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if (len(q_pids), len(q_camids)) != (num_q, num_q) or (len(g_pids), len(g_camids)) != (num_g, num_g):
        raise ValueError(
            f"distmat is {num_q}x{num_g} but got {len(q_pids)} query pids, {len(q_camids)} query cameras, "
            f"{len(g_pids)} gallery pids, {len(g_camids)} gallery cameras"
        )
    if max_rank < 1:
        raise ValueError("max_rank must be >= 1")
    nan_rows = int(np.isnan(distmat.min(axis=1)).sum()) if distmat.size else 0  # min carries NaN; half isnan's time
    if nan_rows:  # NaN compares false with everything: each positive would rank first, and mAP read 1.0
        raise ValueError(f"the distance matrix holds NaN for {nan_rows} of {num_q} queries: no ranking exists; "
                         f"the embeddings behind it are not finite numbers")
    g_junk = g_pids == JUNK_PID
    first_ranks, aps, inps = [], [], []
    for i in range(num_q):
        same_pid = g_pids == q_pids[i]
        removed = (same_pid & (g_camids == q_camids[i])) | g_junk
        positive = same_pid & ~removed
        if not positive.any():
            continue
        ranks = _match_ranks(distmat[i], positive, ~removed & ~same_pid)
        first_ranks.append(ranks[0])
        aps.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
        inps.append(len(ranks) / ranks[-1])
    if not aps:
        raise ValueError("no query has a matching gallery item from another camera; mAP is undefined")
    first = np.asarray(first_ranks)
    cmc = (first[None, :] <= np.arange(1, max_rank + 1)[:, None]).mean(axis=1)
    m_ap = float(np.mean(aps))
    if return_minp:
        return cmc, m_ap, float(np.mean(inps))
    return cmc, m_ap
