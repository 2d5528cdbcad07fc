"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017) without dense (query+gallery)^2 matrices.

The widely copied implementation builds several dense N x N matrices (N = queries + gallery): at
Market-1501 scale that is over 12 GB and a full argsort of 530 M distances. Here:

- the k1+1 nearest neighbours of every item come from a blocked exact search (FAISS, BLAS), and
  each item's largest distance (the normalizer) from a second blocked pass; memory is
  O(N * k1 + chunk * N), the chunk set by ``max_memory``. A problem whose N x N distances fit
  in ``max_memory`` (a served search's candidate pool, a small evaluation) takes them from one
  matrix product instead, which also gives the pair distances below: 2-3x faster at N = 1,500;
- k-reciprocal sets, their expansion and the weights are computed on those neighbour lists and
  kept as a sparse matrix V with a few dozen entries per row;
- local query expansion is a sparse product, and the Jaccard distance is accumulated only over
  the columns a query and a gallery item share.

The arithmetic follows the published algorithm exactly (squared Euclidean original distance
divided by each item's largest distance; neighbour ranks from it; half-size candidate sets of
round(k1/2) (half to even); a candidate set joins when more than 2/3 of it is in the probe's
k-reciprocal set; weights exp(-d) normalized to sum 1; query expansion averages the k2 nearest
rows; Jaccard = 1 - sum(min)/sum(max); final = (1 - lambda) * jaccard + lambda * original), so its
output equals the dense reference to float rounding.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from retrieval.cancellation import check_cancelled
from retrieval.faiss_setup import import_faiss

_BYTES_PER_CELL = 12  # float32 distances plus temporaries in a chunk x N block
# Cells of the arrays one chunk of the reciprocal-set and expansion steps builds (rows x k x k
# neighbour ids; rows x (k1+1) x half-set x (k1+1) comparisons): 32 Mi of them. Fixed row counts
# took 10-30 MB at k1 = 20 but over 1 GB at k1 = 100, and 30 GiB at k1 = 1,000.
_EXPANSION_CELLS = 2**25
# Items searched for their neighbours at once: a caller that has gone stops the search between
# groups (check_cancelled) instead of after every item's search.
_NEIGHBOUR_ROWS = 16384


def _chunk_rows(n_cols: int, max_memory: int) -> int:
    return int(max(1, min(8192, max_memory // (_BYTES_PER_CELL * max(n_cols, 1)))))


def _neighbours(feats: np.ndarray, k: int) -> np.ndarray:
    """Indices (N x k) of each item's k nearest items by squared Euclidean distance, nearest first.

    FAISS's exact search works in fixed-size blocks, so its memory stays bounded at any N.
    """
    index = import_faiss().IndexFlatL2(feats.shape[1])
    index.add(feats)
    out = np.empty((len(feats), k), dtype=np.int64)
    for start in range(0, len(feats), _NEIGHBOUR_ROWS):
        check_cancelled()
        out[start : start + _NEIGHBOUR_ROWS] = index.search(feats[start : start + _NEIGHBOUR_ROWS], k)[1]
    return out


def _row_max_sq_dist(feats: np.ndarray, sq: np.ndarray, max_memory: int) -> np.ndarray:
    """Each item's largest squared distance to any item (the published normalizer), blockwise."""
    n = len(feats)
    step = _chunk_rows(n, max_memory)
    out = np.empty(n, dtype=np.float32)
    for start in range(0, n, step):
        check_cancelled()
        block = feats[start : start + step] @ feats.T
        block *= -2.0
        block += sq[None, :]
        out[start : start + step] = block.max(axis=1) + sq[start : start + step]
    return out


def _torch_device(device: str):
    """None for the numpy/FAISS path; else the torch device that runs the dense passes.

    torch is imported only here and only when asked for (or, with "auto", when installed), so
    the serving process, which leaves ``device`` at "cpu", never loads it.
    """
    if device == "cpu":
        return None
    try:
        import torch
    except ImportError:
        if device == "auto":
            return None
        raise ValueError(f"re-ranking device {device!r} needs torch") from None
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    try:
        return torch.device(device.removeprefix("torch:"))
    except RuntimeError as exc:
        raise ValueError(f"unknown re-ranking device {device!r}: {exc}") from None


def _dense_pass_torch(feats: np.ndarray, k: int, max_memory: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Row maxima and k nearest neighbours from one blockwise pass on a torch device (GPU)."""
    import torch

    x = torch.from_numpy(feats).to(device)
    sq = (x * x).sum(1)
    n = len(feats)
    step = _chunk_rows(n, max_memory)
    row_max = np.empty(n, dtype=np.float32)
    rank = np.empty((n, k), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, n, step):
            d = sq[start : start + step, None] + sq[None, :] - 2.0 * (x[start : start + step] @ x.T)
            row_max[start : start + step] = d.max(dim=1).values.cpu().numpy()
            rank[start : start + step] = torch.topk(d, k, dim=1, largest=False, sorted=True).indices.cpu().numpy()
    return row_max, rank


def _dense_pass(feats: np.ndarray, sq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All N x N squared distances from one matrix product, their row maxima and each row's k
    nearest (nearest first, ties by index): for N small enough to hold the matrix."""
    dist = feats @ feats.T
    dist *= -2.0
    dist += sq[:, None]
    dist += sq[None, :]
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    near = np.argpartition(dist, k - 1, axis=1)[:, :k]
    order = np.lexsort((near, np.take_along_axis(dist, near, axis=1)), axis=1)
    return dist, dist.max(axis=1), np.take_along_axis(near, order, axis=1)


def _pair_sq_dist(feats: np.ndarray, rows: np.ndarray, cols: np.ndarray, max_memory: int) -> np.ndarray:
    """Squared distance of each (row, col) pair, gathered in chunks: the pairs number about
    N * 25, and gathering all their vectors at once would take 2 * pairs * dim * 4 bytes."""
    out = np.empty(len(rows), dtype=np.float32)
    step = max(1, max_memory // (3 * feats.shape[1] * 4))
    for start in range(0, len(rows), step):
        check_cancelled()
        diff = feats[rows[start : start + step]] - feats[cols[start : start + step]]
        out[start : start + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def _reciprocal_sets(rank: np.ndarray, k: int) -> np.ndarray:
    """Boolean N x k mask: rank[i, j] is in i's k-reciprocal set (i is among its k nearest too)."""
    n = rank.shape[0]
    out = np.empty((n, k), dtype=bool)
    step = max(1, min(4096, _EXPANSION_CELLS // (k * k)))  # rows x k x k neighbour ids gathered
    ids = np.arange(n)
    for start in range(0, n, step):
        fwd = rank[start : start + step, :k]
        out[start : start + step] = (rank[fwd, :k] == ids[start : start + step, None, None]).any(axis=2)
    return out


def _expansion_pairs(rank: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) pairs of every item's expanded k-reciprocal set R*(i, k1), without duplicates."""
    n = rank.shape[0]
    kh = int(np.around(k1 / 2)) + 1
    full = _reciprocal_sets(rank, k1 + 1)
    half = _reciprocal_sets(rank, kh)
    s_set = np.where(full, rank[:, : k1 + 1], -1)  # k-reciprocal sets, -1 padded
    h_set = np.where(half, rank[:, :kh], -1)  # half-size sets of every item
    h_len = half.sum(axis=1)
    rows, cols = [np.repeat(np.arange(n), full.sum(axis=1))], [rank[:, : k1 + 1][full]]
    member = None
    if n * n <= _EXPANSION_CELLS:  # small (a served query's pool): "is j in R(i)?" as one lookup table
        member = np.zeros((n, n), dtype=bool)
        member[rows[0], cols[0]] = True
    step = max(1, min(2048, _EXPANSION_CELLS // ((k1 + 1) ** 2 * kh)))
    for start in range(0, n, step):
        check_cancelled()
        s = s_set[start : start + step]  # B x (k1+1)
        cand = np.where(s >= 0, s, 0)
        hc = h_set[cand]  # B x (k1+1) x kh: each candidate's half set
        if member is not None:
            inside = (member[np.arange(start, start + len(s))[:, None, None], np.maximum(hc, 0)] & (hc >= 0)).sum(axis=2)
        else:
            inside = ((hc[..., None] == s[:, None, None, :]) & (hc[..., None] >= 0)).any(axis=3).sum(axis=2)
        take = (s >= 0) & (inside > 2.0 / 3.0 * h_len[cand])
        b, c = np.nonzero(take)
        members = hc[b, c]  # (#taken) x kh
        r = np.repeat(b + start, kh)
        m = members.ravel()
        keep = m >= 0
        rows.append(r[keep])
        cols.append(m[keep])
    rows_all, cols_all = np.concatenate(rows), np.concatenate(cols)
    if member is not None:  # the table again, now for R*: its nonzeros come without duplicates, in order
        member[rows_all, cols_all] = True
        return np.nonzero(member)
    keys = np.unique(rows_all * n + cols_all)
    return keys // n, keys % n


def k_reciprocal_rerank(
    query_feats: np.ndarray,
    gallery_feats: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    max_memory: int = 256 * 2**20,
    device: str = "cpu",
) -> np.ndarray:
    """Re-ranked query x gallery distance matrix (float32).

    ``max_memory`` bounds the bytes of each dense block (distance chunks); the sparse structures
    grow linearly with the number of items. ``device``: "cpu" (numpy + FAISS), "auto" (CUDA
    through torch when available, else cpu), or a torch device ("cuda", "cuda:1", "torch:cpu")
    for the two dense passes (row maxima and nearest neighbours); the sparse steps stay on the CPU.
    """
    q = np.ascontiguousarray(query_feats, dtype=np.float32)
    g = np.ascontiguousarray(gallery_feats, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"query and gallery features must be 2-D with equal widths, got {q.shape} and {g.shape}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError("need k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1")
    feats = np.concatenate([q, g])
    n, nq = len(feats), len(q)
    kk = min(k1 + 1, n)
    k2 = min(k2, n)  # fewer items than k2: expand over all of them, as slicing a full ranking would
    sq = (feats * feats).sum(axis=1)
    accel = _torch_device(device)
    dist = None
    if accel is None and n * n * _BYTES_PER_CELL <= max_memory:
        dist, row_max, rank = _dense_pass(feats, sq, max(kk, k2))
    elif accel is None:
        row_max = _row_max_sq_dist(feats, sq, max_memory)
        rank = _neighbours(feats, max(kk, k2))
    else:
        row_max, rank = _dense_pass_torch(feats, max(kk, k2), max_memory, accel)
    row_max[row_max <= 0] = 1.0  # all items identical: every distance is 0 anyway

    rows, cols = _expansion_pairs(rank, kk - 1)
    d = (dist[rows, cols] if dist is not None else _pair_sq_dist(feats, rows, cols, max_memory)) / row_max[rows]
    w = np.exp(-d)
    w /= np.bincount(rows, weights=w, minlength=n)[rows]
    v = sp.csr_matrix((w.astype(np.float64), (rows, cols)), shape=(n, n))
    if k2 > 1:
        qe = sp.csr_matrix(
            (np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), rank[:, :k2].ravel())), shape=(n, n)
        )
        v = (qe @ v).tocsr()
    v.sort_indices()
    v_sum = np.asarray(v.sum(axis=1)).ravel()
    gallery_cols = v[nq:].tocsc()  # column k -> gallery rows sharing it
    col_len = np.diff(gallery_cols.indptr)
    q_part = v[:nq]
    # (query nonzero, gallery row) pairs each query touches: bounds the gather arrays per chunk.
    work = np.bincount(q_part.tocoo().row, weights=col_len[q_part.indices], minlength=nq) if q_part.nnz else np.zeros(nq)
    out = np.empty((nq, len(g)), dtype=np.float32)
    max_rows = max(1, max_memory // (40 * max(len(g), 1)))
    max_pairs = max(1, max_memory // 40)
    start = 0
    while start < nq:
        check_cancelled()
        stop = start + 1
        budget = work[start]
        while stop < nq and stop - start < max_rows and budget + work[stop] <= max_pairs:
            budget += work[stop]
            stop += 1
        out[start:stop] = _final_block(
            v[start:stop].tocoo(), gallery_cols, col_len, v_sum, nq, start, stop, feats, sq, g, row_max, lambda_value
        )
        start = stop
    return out


def _final_block(block, gallery_cols, col_len, v_sum, nq, start, stop, feats, sq, g, row_max, lambda_value):
    """(1 - lambda) * Jaccard + lambda * original distance for queries start..stop."""
    ng = len(g)
    lengths = col_len[block.col]
    total = int(lengths.sum())
    qrow = np.repeat(block.row, lengths)
    qval = np.repeat(block.data, lengths)
    offsets = np.repeat(gallery_cols.indptr[block.col] - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    mins = np.minimum(qval, gallery_cols.data[offsets])
    keys = qrow * ng + gallery_cols.indices[offsets]
    shared = np.bincount(keys, weights=mins, minlength=(stop - start) * ng).reshape(stop - start, ng)
    jaccard = 1.0 - shared / (v_sum[start:stop, None] + v_sum[None, nq:] - shared)
    original = sq[start:stop, None] + sq[None, nq:] - 2.0 * (feats[start:stop] @ g.T)
    original = np.maximum(original, 0.0) / row_max[start:stop, None]
    return (1.0 - lambda_value) * jaccard + lambda_value * original
