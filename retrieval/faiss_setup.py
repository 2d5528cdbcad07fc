"""Import FAISS once with settings that suit ReID workloads.

faiss-cpu 1.15 only switches to BLAS for exact search from 128,000 queries up
(``distance_compute_blas_threshold``); below that its scalar kernels are 7-9x slower than BLAS on
a 2-core machine even for a few dozen queries. 20 is the threshold FAISS used to ship with.

Its OpenMP threads default to every core the process sees; under a cgroup CPU quota they are
capped at the quota (see ``retrieval.cpu_quota``) unless ``OMP_NUM_THREADS`` says otherwise.
"""
from __future__ import annotations

import functools
import logging
import os

from retrieval.cpu_quota import usable_cores

BLAS_THRESHOLD = 20

log = logging.getLogger(__name__)


def import_faiss():
    import faiss

    if faiss.cvar.distance_compute_blas_threshold != BLAS_THRESHOLD:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    _fit_threads_to_quota(faiss)
    return faiss


@functools.cache
def _fit_threads_to_quota(faiss) -> None:
    cores, quota_bound = usable_cores()
    if quota_bound and "OMP_NUM_THREADS" not in os.environ and faiss.omp_get_max_threads() > cores:
        log.info("a CPU quota allows %d core(s): FAISS searches use %d OpenMP threads, not %d", cores, cores,
                 faiss.omp_get_max_threads())
        faiss.omp_set_num_threads(cores)
