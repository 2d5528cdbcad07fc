"""The CPUs a process may really use: its affinity, capped by a cgroup CPU quota.

A container limited to N CPUs (``docker run --cpus``, a Kubernetes CPU limit) still sees every core
of its host in its affinity, and ONNX Runtime and OpenMP (FAISS) size their thread pools by what
they see. Threads beyond the quota do not add speed: they spend it sooner, and the kernel then
stops the whole process for the rest of each period (100 ms by default).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cpu_quota_cores() -> int | None:
    """The cores a cgroup CPU quota allows this process, rounded up; None without a quota."""
    try:
        quota, period = (CGROUP_ROOT / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (CGROUP_ROOT / "cpu" / "cpu.cfs_quota_us").read_text().strip()  # -1: none
            period = (CGROUP_ROOT / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:
        return None
    return max(1, math.ceil(quota_us / period_us))


def usable_cores() -> tuple[int, bool]:
    """(cores this process may use, whether a cgroup quota is what limits it)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS has none
    quota = cpu_quota_cores()
    return (quota, True) if quota is not None and quota < affinity else (affinity, False)
