"""Market-1501 metrics against a brute-force per-query implementation."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.metrics import evaluate_rank, queries_with_matches


def brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    cmcs, aps, inps = [], [], []
    for i in range(len(q_pids)):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~(((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])) | (g_pids[order] == -1))
        matches = (g_pids[order] == q_pids[i])[keep].astype(float)
        if not matches.any():
            continue
        cmc = np.minimum(matches.cumsum(), 1.0)
        cmc = np.concatenate([cmc, np.ones(max(0, max_rank - len(cmc)))])[:max_rank]
        cmcs.append(cmc)
        hits = matches.cumsum()
        positions = np.flatnonzero(matches) + 1
        aps.append(np.mean(hits[positions - 1] / positions))
        inps.append(matches.sum() / positions[-1])
    return np.mean(cmcs, axis=0), np.mean(aps), np.mean(inps)


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_with_ties_distractors_junk_and_same_camera(seed):
    rng = np.random.default_rng(seed)
    nq, ng = 25, 80
    q_pids = rng.integers(1, 10, nq)
    g_pids = rng.integers(-1, 10, ng)  # -1 junk, 0 distractor
    q_cams, g_cams = rng.integers(1, 3, nq), rng.integers(1, 3, ng)
    # rounded distances create many ties
    dist = np.round(rng.random((nq, ng)) * 4) / 4 if seed % 2 else rng.random((nq, ng)).astype(np.float32)
    q_pids[0] = 99  # a query with no match at all: skipped
    cmc, m_ap, m_inp = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50, return_minp=True)
    cmc_ref, ap_ref, inp_ref = brute_force(dist, q_pids, g_pids, q_cams, g_cams, 50)
    np.testing.assert_allclose(cmc, cmc_ref, atol=1e-6)
    assert m_ap == pytest.approx(ap_ref, abs=1e-6)
    assert m_inp == pytest.approx(inp_ref, abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_queries_with_matches_are_those_the_protocol_scores(seed):
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, 8, 30), rng.integers(-1, 8, 40)
    q_cams, g_cams = rng.integers(1, 4, 30), rng.integers(1, 4, 40)
    q_pids[0] = 99  # nobody in the gallery
    q_pids[1], q_cams[1], g_pids[0], g_cams[0] = 50, 1, 50, 1  # only seen by the query's own camera
    mask = queries_with_matches(q_pids, g_pids, q_cams, g_cams)
    expected = [((g_pids == p) & (g_cams != c)).any() for p, c in zip(q_pids, q_cams)]
    assert mask.tolist() == expected and 0 < mask.sum() < len(mask)
    # evaluate_rank averages over exactly these queries: rank-1 of a perfect ranking counts them all
    dist = (g_pids[None, :] != q_pids[:, None]).astype(float)
    cmc, _ = evaluate_rank(dist[mask], q_pids[mask], g_pids, q_cams[mask], g_cams, max_rank=1)
    assert cmc[0] == 1.0


def test_hand_computed_example():
    # gallery order by distance: g0 (other pid), g1 (match), g2 (same pid same cam: removed), g3 (match)
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    cmc, m_ap = evaluate_rank(dist, np.array([1]), np.array([2, 1, 1, 1]), np.array([1]), np.array([2, 2, 1, 2]), max_rank=3)
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0])
    assert m_ap == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_no_valid_query_and_shape_errors():
    with pytest.raises(ValueError, match="no query has a matching gallery item"):
        evaluate_rank(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), np.array([1]), np.array([1, 2]))
    with pytest.raises(ValueError, match="distmat is 1x2"):
        evaluate_rank(np.zeros((1, 2)), np.array([1, 2]), np.array([1, 2]), np.array([1]), np.array([1, 2]))


def test_nan_distances_are_refused_and_infinite_ones_rank_last():
    """NaN compares false with everything: every match ranked first and a broken model scored mAP 1.0."""
    q, g = np.array([1, 2]), np.array([1, 2, 3])
    qc, gc = np.array([1, 1]), np.array([2, 2, 2])
    dist = np.array([[0.5, 0.1, 0.2], [0.3, 0.25, 0.2]])
    nan = dist.copy()
    nan[1, 0] = np.nan
    with pytest.raises(ValueError, match="holds NaN for 1 of 2 queries"):
        evaluate_rank(nan, q, g, qc, gc)
    inf = dist.copy()
    inf[0, 0] = np.inf  # query 0's match, not returned by a search: after both other items
    cmc, m_ap = evaluate_rank(inf, q, g, qc, gc, max_rank=3)
    np.testing.assert_allclose(cmc, [0.0, 0.5, 1.0])
    assert m_ap == pytest.approx((1 / 3 + 1 / 2) / 2)  # query 1's match is second


def test_l2_normalize_survives_huge_finite_values():
    from retrieval.distance import l2_normalize

    out = l2_normalize(np.array([[3e30, 4e30], [0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)


def test_distance_helpers_match_their_definitions():
    from retrieval.distance import compute_distance

    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 8)).astype(np.float32) * 100
    b = np.concatenate([a[:2], rng.normal(size=(4, 8)).astype(np.float32)])  # two exact duplicates
    diff = a[:, None, :].astype(np.float64) - b[None, :, :]
    sq = (diff ** 2).sum(-1)
    got = compute_distance(a, b, "sqeuclidean")
    assert got.min() >= 0.0  # the expansion's rounding below zero at the duplicates is clipped
    np.testing.assert_allclose(got, sq, rtol=1e-4, atol=0.5)  # |a|^2 ~ 1e5: float32 rounding of the expansion
    np.testing.assert_allclose(compute_distance(a, b, "euclidean") ** 2, sq, rtol=1e-4, atol=0.5)
    cos = 1 - (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]
    np.testing.assert_allclose(compute_distance(a, b), cos, atol=1e-5)
    assert compute_distance(a, b)[0, 0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("metric, shapes, message", [("manhattan", ((2, 4), (3, 4)), "unknown metric"),
                                                     ("cosine", ((2, 4), (3, 5)), "equal widths"),
                                                     ("cosine", ((4,), (3, 4)), "2-D")])
def test_compute_distance_refuses_what_it_cannot_compare(metric, shapes, message):
    from retrieval.distance import compute_distance

    a, b = (np.ones(s, dtype=np.float32) for s in shapes)
    with pytest.raises(ValueError, match=message):
        compute_distance(a, b, metric)
