"""Parity checks between consecutive export stages: every row must keep its direction."""
from __future__ import annotations

import numpy as np

from export.errors import ExportError

# The batch sizes each stage is checked at: one image, and a batch that is no power of two.
CHECK_BATCHES = (1, 7)


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ExportError(f"outputs differ in shape: {a.shape} vs {b.shape}")
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(a - b).max(1) == 0, 1.0, 0.0))


def check_parity(reference: np.ndarray, candidate: np.ndarray, threshold: float, what: str) -> float:
    """Minimum row cosine; raises ``ExportError`` when any row is below ``threshold`` or not finite."""
    if not np.isfinite(candidate).all():
        raise ExportError(f"{what}: output contains NaN or inf")
    cos = row_cosines(reference, candidate)
    worst = float(cos.min())
    if worst < threshold:
        raise ExportError(f"{what}: parity check failed, worst row cosine {worst:.6f} < {threshold} "
                          f"({int((cos < threshold).sum())} of {len(cos)} rows below)")
    return worst


def check_inputs(batch_sizes: tuple[int, ...], height: int, width: int, seed: int = 0) -> dict[int, np.ndarray]:
    """Deterministic 0..1 check batches, one per batch size."""
    rng = np.random.default_rng(seed)
    return {n: rng.random((n, 3, height, width), dtype=np.float32) for n in batch_sizes}
