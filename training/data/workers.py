"""How many data-loader processes a job starts.

``dataset.num_workers`` defaults to TAO's 8, sized for GPU servers. On a machine (or a container
with a CPU quota) of fewer cores, 8 processes decoding images only take turns on those cores,
each loader start forks them all, and torch warns at every loader that the number exceeds what
the system suggests. Left at its default, the number is therefore capped at the cores this
process may use, shared among the run's processes; set on purpose, it is taken as given.
"""
from __future__ import annotations

import functools
import logging

from retrieval.cpu_quota import usable_cores
from training.data.shared_memory import WORKERS_KEY

log = logging.getLogger(__name__)


def loader_workers(spec, world_size: int = 1) -> int:
    """Data-loader processes per process of the run, for ``spec`` (an ``ExperimentSpec``)."""
    wanted = spec.dataset.num_workers
    if WORKERS_KEY in spec.given_keys:
        return wanted
    cores, quota = usable_cores()
    workers = min(wanted, max(1, cores // world_size))
    if workers < wanted:
        _say_capped(workers, wanted, cores, quota)
    return workers


@functools.cache  # once per process: validation and evaluation build a loader per image set
def _say_capped(workers: int, wanted: int, cores: int, quota: bool) -> None:
    log.info("%d data-loader process(es), not the default %s=%d: this process may use %d core(s)%s; "
             "set %s to choose", workers, WORKERS_KEY, wanted, cores, " (a CPU quota)" if quota else "", WORKERS_KEY)
