"""Sparse k-reciprocal re-ranking against the dense oracle written from the paper."""
from __future__ import annotations

import numpy as np
import pytest

from retrieval.distance import l2_normalize, squared_euclidean
from retrieval.rerank import k_reciprocal_rerank
from tests.rerank_oracle import dense_rerank


def _clustered(rng, nq, ng, dim, ids=20, noise=0.8):
    centers = rng.normal(size=(ids, dim))
    q = centers[rng.integers(0, ids, nq)] + rng.normal(size=(nq, dim)) * noise
    g = centers[rng.integers(0, ids, ng)] + rng.normal(size=(ng, dim)) * noise
    return q.astype(np.float32), g.astype(np.float32)


@pytest.mark.parametrize(
    "nq, ng, dim, k1, k2, lam",
    [(30, 150, 16, 20, 6, 0.3), (40, 260, 32, 10, 3, 0.5), (12, 50, 8, 5, 1, 0.0), (25, 90, 64, 7, 6, 1.0), (5, 12, 4, 20, 6, 0.3),
     (1, 3, 8, 20, 6, 0.3),  # fewer items than k1 and k2 (a tiny gallery's pool)
     (8, 30, 8, 1, 1, 0.3)],  # the smallest k1 and k2 allowed
)
@pytest.mark.parametrize("max_memory", [256 * 2**20, 8 * 1024], ids=["one-matrix", "blocked"])
def test_matches_dense_oracle(nq, ng, dim, k1, k2, lam, max_memory):
    """Both paths: the N x N matrix when it fits the budget, blocked passes when it does not."""
    rng = np.random.default_rng(nq + ng)
    q, g = _clustered(rng, nq, ng, dim)
    expected = dense_rerank(q, g, k1, k2, lam)
    got = k_reciprocal_rerank(q, g, k1, k2, lam, max_memory=max_memory)
    assert got.shape == (nq, ng)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_array_equal(np.argsort(got, axis=1, kind="stable")[:, :10],
                                  np.argsort(expected, axis=1, kind="stable")[:, :10])


@pytest.mark.parametrize("max_memory", [256 * 2**20, 8 * 1024], ids=["one-matrix", "blocked"])
def test_matches_dense_oracle_where_every_distance_is_below_one(max_memory):
    """L2-normalized embeddings of a few similar people (a search pool of look-alikes): each row's
    largest squared distance is below 1, where the scaling by it matters most. The clustered data
    above never goes there (its rows reach far beyond 1)."""
    rng = np.random.default_rng(7)
    q, g = _clustered(rng, 10, 40, 32, ids=3, noise=0.1)
    q, g = l2_normalize(q + 4), l2_normalize(g + 4)
    assert (squared_euclidean(np.vstack([q, g]), np.vstack([q, g])).max(1) < 1).all()
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, 8, 3, 0.3, max_memory=max_memory),
                               dense_rerank(q, g, 8, 3, 0.3), atol=1e-4)


def test_small_memory_budget_gives_the_same_answer():
    rng = np.random.default_rng(1)
    q, g = _clustered(rng, 30, 200, 16)
    np.testing.assert_allclose(
        k_reciprocal_rerank(q, g, max_memory=64 * 1024), k_reciprocal_rerank(q, g), atol=1e-6
    )


def test_expansion_in_small_chunks_gives_the_same_answer(monkeypatch):
    """The expansion step works on chunks of rows sized for a memory budget (a large k1 makes its
    comparison grow with k1 cubed): many chunks must give what one does."""
    import retrieval.rerank

    rng = np.random.default_rng(3)
    q, g = _clustered(rng, 20, 150, 16)
    whole = k_reciprocal_rerank(q, g, k1=12, k2=4)
    monkeypatch.setattr(retrieval.rerank, "_EXPANSION_CELLS", 13 * 13 * 7 * 5)  # 5 rows a chunk
    np.testing.assert_array_equal(k_reciprocal_rerank(q, g, k1=12, k2=4), whole)


def test_neighbours_searched_in_groups_give_the_same_answer(monkeypatch):
    import retrieval.rerank

    rng = np.random.default_rng(4)
    q, g = _clustered(rng, 20, 150, 16)
    whole = k_reciprocal_rerank(q, g, max_memory=64 * 1024)  # too small for the one-matrix path
    monkeypatch.setattr(retrieval.rerank, "_NEIGHBOUR_ROWS", 7)
    np.testing.assert_array_equal(k_reciprocal_rerank(q, g, max_memory=64 * 1024), whole)


@pytest.mark.parametrize("max_memory", [256 * 2**20, 64 * 1024])  # one matrix; blocks and FAISS
def test_rerank_stops_once_its_caller_has_gone(max_memory):
    """Served searches run in worker threads that outlive a caller who gave up; re-ranking checks
    between its steps and stops. Outside a served call the checks never fire."""
    import threading

    from retrieval.cancellation import Cancelled, check_cancelled, run_cancellable

    rng = np.random.default_rng(5)
    q, g = _clustered(rng, 10, 100, 16)
    ended = threading.Event()
    np.testing.assert_array_equal(run_cancellable(ended, k_reciprocal_rerank, q, g, 20, 6, 0.3, max_memory),
                                  k_reciprocal_rerank(q, g, max_memory=max_memory))
    ended.set()
    with pytest.raises(Cancelled):
        run_cancellable(ended, k_reciprocal_rerank, q, g, 20, 6, 0.3, max_memory)
    check_cancelled()  # this thread runs for no call: nothing to stop


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="equal widths"):
        k_reciprocal_rerank(np.zeros((2, 3)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="k1 >= 1"):
        k_reciprocal_rerank(np.zeros((2, 3)), np.zeros((4, 3)), k1=0)


def test_torch_dense_pass_gives_the_same_answer():
    """The accelerated path (CUDA on a GPU machine) exercised on torch's CPU device."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    q, g = _clustered(rng, 25, 140, 16)
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, device="torch:cpu", max_memory=32 * 1024),
                               k_reciprocal_rerank(q, g), atol=1e-5)
    np.testing.assert_allclose(k_reciprocal_rerank(q[:1], g[:3], device="torch:cpu"), dense_rerank(q[:1], g[:3]), atol=1e-5)
    with pytest.raises(ValueError, match="unknown re-ranking device"):
        k_reciprocal_rerank(q, g, device="tpu:7")


@pytest.mark.gpu
def test_cuda_rerank_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    rng = np.random.default_rng(3)
    q, g = _clustered(rng, 40, 300, 32)
    np.testing.assert_allclose(k_reciprocal_rerank(q, g, device="cuda"), k_reciprocal_rerank(q, g), atol=1e-4)
