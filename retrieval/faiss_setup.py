"""Import FAISS once with settings that suit ReID workloads.

faiss-cpu 1.15 only switches to BLAS for exact search from 128,000 queries up
(``distance_compute_blas_threshold``); below that its scalar kernels are 7-9x slower than BLAS on
a 2-core machine even for a few dozen queries. 20 is the threshold FAISS used to ship with.
"""
from __future__ import annotations

BLAS_THRESHOLD = 20


def import_faiss():
    import faiss

    if faiss.cvar.distance_compute_blas_threshold != BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss
