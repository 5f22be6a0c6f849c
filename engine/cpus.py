"""How many CPUs this process may use: for the engine's threads, training's and the benchmarks', from a
module that imports no runtime (a training or benchmark process need not load onnxruntime to ask)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (its affinity: taskset, cgroup cpusets), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
