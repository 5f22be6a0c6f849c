"""How many CPUs and how much memory this process may use: for the engine's threads and batches, training's
and the benchmarks', from a module that imports no runtime (a training or benchmark process need not load
onnxruntime to ask).

Two CPU limits apply on Linux: the CPUs the process may run on (its affinity: `taskset`, a cgroup cpuset,
`docker --cpuset-cpus`) and the CPU time its cgroup may use (a CFS quota: `docker --cpus 2`, a Kubernetes
CPU limit). ONNX Runtime and torch size their thread pools by the machine's cores and see neither quota:
on a 32-core host, a container allowed 2 CPUs would run 16 or 32 threads that the quota throttles in turn,
each waiting at every barrier for the others (throughput falls many times over, without an error).

Memory is the same story: /proc/meminfo shows the host's, while a cgroup memory limit (`docker --memory`,
a Kubernetes memory limit) is what the kernel's OOM killer enforces, with SIGKILL and no word to the user.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 mounts the cpu controller under one of these names (alone, or joined with cpuacct).
V1_CPU_MOUNTS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


def cpu_cores(count: int) -> str:
    """"1 CPU core", "2 CPU cores": for messages."""
    return f"{count} CPU core{'s' if count != 1 else ''}"


def readable_bytes(count: int) -> str:
    """A size for messages: GiB with one decimal from 1 GiB, else whole MiB."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


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
        return _smallest_quota(_cgroup_lines(proc_cgroup), root)
    except ValueError:
        return None


def _cgroup_lines(proc_cgroup: Path) -> list[str]:
    """The lines of /proc/self/cgroup ([] where it cannot be read: not Linux)."""
    try:
        # os.fsdecode: a cgroup's name may be any bytes, and stays a path that names it.
        return os.fsdecode(proc_cgroup.read_bytes()).splitlines()
    except OSError:
        return []


def _smallest_quota(lines: list[str], root: Path) -> float | None:
    read = {2: _read_cpu_max, 1: _read_cfs_quota}
    quotas = [q for directory, version in _cgroup_dirs(lines, root, "cpu", V1_CPU_MOUNTS)
              if (q := read[version](directory)) is not None]  # fmt: skip
    return min(quotas) if quotas else None


def _cgroup_dirs(lines: list[str], root: Path, controller: str, v1_mounts: tuple[str, ...]) -> list[tuple[Path, int]]:
    """The folders (and cgroup versions, 2 or 1) of this process's cgroup and each parent up to the mount, for
    `controller`, from the lines of /proc/self/cgroup: v2's unified hierarchy and v1's mount of the controller."""
    found: list[tuple[Path, int]] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2's unified hierarchy: "0::/path"
            found += [(directory, 2) for directory in _dirs_along(root, root / path.lstrip("/"))]
        elif controller in controllers.split(","):
            for mount in (root / name for name in v1_mounts):
                if _is_dir(mount):
                    found += [(directory, 1) for directory in _dirs_along(mount, mount / path.lstrip("/"))]
                    break
    return found


def _dirs_along(mount: Path, cgroup: Path) -> list[Path]:
    """`cgroup` and each parent up to `mount`. Inside a container the path /proc names is often the host's,
    not mounted here: then the mount itself is the container's own cgroup."""
    if not _is_dir(cgroup) or mount not in (cgroup, *cgroup.parents):
        cgroup = mount
    directories = []
    for directory in (cgroup, *cgroup.parents):
        directories.append(directory)
        if directory == mount:
            break
    return directories


MEMINFO = Path("/proc/meminfo")
V1_MEMORY_MOUNTS = ("memory",)
# cgroup v1 writes "no limit" as the largest page-aligned 64-bit number (9223372036854771712); v2 as "max".
NO_MEMORY_LIMIT = 1 << 62


def memory_total(meminfo: Path = MEMINFO) -> int | None:
    """Bytes of memory this process may use at most: the machine's, capped by its cgroup's memory limit; None
    where neither can be read."""
    return _smallest(_meminfo(meminfo).get("MemTotal"), cgroup_memory_limit())


def memory_available(meminfo: Path = MEMINFO) -> int | None:
    """Bytes this process can still take: the machine's MemAvailable, capped by what its cgroup's memory limit
    leaves (the limit less what the cgroup holds, page cache it can drop not counted); None where neither can
    be read. Past it the kernel swaps, or kills the process (exit 137)."""
    return _smallest(_meminfo(meminfo).get("MemAvailable"), cgroup_memory_headroom())


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process's cgroup and its parents allow (the smallest limit), from cgroup v2's `memory.max` or
    v1's `memory.limit_in_bytes`; None without a limit or where none can be read."""
    limits = [limit for limit, _ in _memory_limits(proc_cgroup, root)]
    return min(limits) if limits else None


def cgroup_memory_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process's cgroup can still take before a limit (its own or a parent's) is reached; None
    without a limit or where none can be read."""
    rooms = [max(0, limit - used) for limit, used in _memory_limits(proc_cgroup, root) if used is not None]
    return min(rooms) if rooms else None


def _memory_limits(proc_cgroup: Path, root: Path) -> list[tuple[int, int | None]]:
    """(limit, bytes held) of each cgroup with a memory limit from this process's up to the mount. Bytes held
    leave out the page cache of files no process maps: the kernel drops it before it kills (cached pages
    of a process that has ended stay charged to the cgroup, and would otherwise count as taken)."""
    found: list[tuple[int, int | None]] = []
    for directory, version in _cgroup_dirs(_cgroup_lines(proc_cgroup), root, "memory", V1_MEMORY_MOUNTS):
        limit_file, used_file, prefix, mapped = (
            ("memory.max", "memory.current", "", "file_mapped") if version == 2
            else ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_", "total_mapped_file")
        )  # fmt: skip
        limit = _read_int(directory / limit_file)  # v2's "max" reads as None
        if limit is None or limit <= 0 or limit >= NO_MEMORY_LIMIT:
            continue
        used = _read_int(directory / used_file)
        if used is not None:
            stat = _memory_stat(directory)
            droppable = stat.get(prefix + "active_file", 0) + stat.get(prefix + "inactive_file", 0) - stat.get(mapped, 0)
            used = max(0, used - max(0, droppable))
        found.append((limit, used))
    return found


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _memory_stat(directory: Path) -> dict[str, int]:
    """The counters of the cgroup's `memory.stat` ("key value" lines); {} where it cannot be read."""
    counters = {}
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if value.strip().isdigit():
                counters[name] = int(value)
    except OSError:
        pass
    return counters


def _meminfo(path: Path) -> dict[str, int]:
    """/proc/meminfo's fields in bytes ({} where it cannot be read: not Linux)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024  # given in kB
    return values


def _smallest(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


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
