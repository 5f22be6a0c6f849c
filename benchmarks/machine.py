"""Facts about the machine and the process: CPU, cores, memory, library versions, peak RSS."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.resources import (
    available_cores,
    cgroup_cpu_quota,
    cgroup_memory_limit,
    memory_available,
    memory_total,
)

LIBRARIES = (
    "edlight",
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "onnxruntime",
    "onnx",
    "numpy",
    "tokenizers",
    "pillow",
)
# CPU features that decide which kernels ONNX Runtime and PyTorch can use.
INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) memory in bytes for this process, None where unknown: the machine's, capped by its
    cgroup's memory limit (a container's), which is what the kernel kills a worker by."""
    return memory_total(), memory_available()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_info(threads: int) -> dict[str, Any]:
    """What results.json records about where it ran."""
    # Imported here: the workers import this module, and loading onnxruntime would count in their peak RSS.
    from engine.session import cpu_flags, cpuinfo_field

    flags = cpu_flags()
    total, available = memory_bytes()
    return {
        "cpu_model": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "available_cpus": available_cores(),  # the affinity, capped by a cgroup CPU quota
        "cpu_quota": cgroup_cpu_quota(),  # CPUs' worth of time the cgroup allows; None: no quota
        "physical_cores": physical_cores(),
        "threads": threads,
        "memory_total_bytes": total,  # capped by the cgroup's limit
        "memory_limit_bytes": cgroup_memory_limit(),  # the cgroup's memory limit; None: none
        "memory_available_bytes": available,
        "platform": platform.platform(),
        "versions": library_versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (high-water mark, never decreases).

    On Linux this is VmHWM, the peak of the process's own address space. Not ru_maxrss: Linux
    carries the parent's RSS at fork over into a child's ru_maxrss across exec, so a worker
    started by a 1 GB parent would never report less than 1 GB.
    """
    value = _proc_status_bytes("VmHWM:")
    if value is not None:
        return value
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, others KiB


def current_rss_bytes() -> int | None:
    return _proc_status_bytes("VmRSS:")


def _proc_status_bytes(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return None
