"""How many CPUs this process may use: for the engine's threads, training's and the benchmarks', from a
module that imports no runtime (a training or benchmark process need not load onnxruntime to ask).

Two limits apply on Linux: the CPUs the process may run on (its affinity: `taskset`, a cgroup cpuset,
`docker --cpuset-cpus`) and the CPU time its cgroup may use (a CFS quota: `docker --cpus 2`, a Kubernetes
CPU limit). ONNX Runtime and torch size their thread pools by the machine's cores and see neither quota:
on a 32-core host, a container allowed 2 CPUs would run 16 or 32 threads that the quota throttles in turn,
each waiting at every barrier for the others (throughput falls many times over, without an error).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the cpu controller under one of these names (alone, or joined with cpuacct).
V1_CPU_MOUNTS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


def available_cores() -> int:
    """CPU cores this process may use: its affinity, capped by its cgroup's CPU quota rounded down, at
    least 1 (a quota of 1.5 CPUs gives 1: threads beyond the quota are throttled, and a throttled thread
    holds up the others at every barrier); all of the machine's where neither can be read (not Linux)."""
    cores = affinity_cores()
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, quota_cores(quota))
    return cores


def affinity_cores() -> int:
    """CPU cores this process may run on (taskset, cpusets), whatever its CPU quota."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def quota_cores(quota: float) -> int:
    """Threads that a CPU quota of `quota` CPUs keeps busy without throttling them: rounded down, at least 1."""
    return max(1, math.floor(quota + 1e-9))


def cgroup_cpu_quota(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period this process's cgroup and its parents allow (the smallest), from
    cgroup v2's `cpu.max` or v1's `cpu.cfs_quota_us`; None without a quota or where none can be read
    (nothing here may stop a command; a cgroup folder this user may not search counts as absent)."""
    try:
        # os.fsdecode: a cgroup's name may be any bytes, and stays a path that names it.
        return _smallest_quota(os.fsdecode(proc_cgroup.read_bytes()).splitlines(), root)
    except (OSError, ValueError):
        return None


def _smallest_quota(lines: list[str], root: Path) -> float | None:
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2's unified hierarchy: "0::/path"
            quotas += _quotas_along(root, root / path.lstrip("/"), _read_cpu_max)
        elif "cpu" in controllers.split(","):
            for mount in (root / name for name in V1_CPU_MOUNTS):
                if _is_dir(mount):
                    quotas += _quotas_along(mount, mount / path.lstrip("/"), _read_cfs_quota)
                    break
    return min(quotas) if quotas else None


def _quotas_along(mount: Path, cgroup: Path, read: Callable[[Path], float | None]) -> list[float]:
    """Quotas of `cgroup` and each parent up to `mount`. Inside a container the path /proc names is often
    the host's, not mounted here: then the mount itself is the container's own cgroup."""
    if not _is_dir(cgroup) or mount not in (cgroup, *cgroup.parents):
        cgroup = mount
    quotas = []
    for directory in (cgroup, *cgroup.parents):
        quota = read(directory)
        if quota is not None:
            quotas.append(quota)
        if directory == mount:
            break
    return quotas


def _is_dir(path: Path) -> bool:
    """Path.is_dir, with a folder this user may not search (a sandbox, a container's profile) as none."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _read_cpu_max(directory: Path) -> float | None:
    """cgroup v2: `cpu.max` holds "<quota> <period>" in microseconds, or "max <period>" (no quota)."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return int(quota) / int(period) if quota != "max" and int(period) > 0 and int(quota) > 0 else None
    except (OSError, ValueError):
        return None


def _read_cfs_quota(directory: Path) -> float | None:
    """cgroup v1: `cpu.cfs_quota_us` (-1: no quota) over `cpu.cfs_period_us`."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
