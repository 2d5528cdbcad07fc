"""Distance helpers used everywhere embeddings are compared.

Keeping one implementation means offline evaluation, re-ranking and gallery search rank items the
same way.
"""
from __future__ import annotations

import numpy as np

# Below this norm a row has no usable direction: l2_normalize leaves it (near) zero.
NORM_EPS = 1e-12


def l2_normalize(x: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """Row-wise L2 normalization (rows of zeros stay zero instead of becoming NaN).

    Norms are taken in float64: squaring float32 values above about 1.8e19 overflows, which would
    turn a finite vector into zeros.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - cosine similarity between every row of ``a`` and every row of ``b`` (range 0..2)."""
    return 1.0 - l2_normalize(a) @ l2_normalize(b).T


def squared_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance matrix, computed with one matrix product and clipped at 0.

    The expansion |a|^2 + |b|^2 - 2ab can go slightly negative from rounding; clipping keeps the
    result a valid distance.
    """
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def euclidean_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix."""
    return np.sqrt(squared_euclidean(a, b))


def compute_distance(a: np.ndarray, b: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Distance matrix by metric name: ``cosine``, ``euclidean`` or ``sqeuclidean``."""
    funcs = {"cosine": cosine_distance, "euclidean": euclidean_distance, "sqeuclidean": squared_euclidean}
    if metric not in funcs:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(funcs)}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature matrices must be 2-D with equal widths, got {a.shape} and {b.shape}")
    return funcs[metric](a, b)
