"""The one place that talks to `onnxruntime.InferenceSession`.

Session options live here; input/output names and types are read from the model, never assumed;
any ONNX Runtime failure is re-raised as `ModelRuntimeError` naming the model file (and so the bundle).
"""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.errors import ModelRuntimeError, is_count
from engine.resources import affinity_cores, available_cores, cgroup_cpu_quota, cpu_cores, quota_cores

# ONNX tensor type strings -> numpy dtypes, for the inputs the engine feeds.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cpuinfo_field(key: str) -> str | None:
    """The first value of `key` ("flags", "model name") in Linux's /proc/cpuinfo; None where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (none where it cannot be read)."""
    return frozenset((cpuinfo_field("flags") or "").split())


def int8_products_saturate() -> bool:
    """Whether ONNX Runtime's uint8 x int8 MatMuls on this CPU add pairs of products in a saturating int16.

    x86 CPUs with AVX2 but without VNNI (AVX512_VNNI or AVX_VNNI) multiply with VPMADDUBSW, whose int16
    pair sums overflow for weights beyond 7 bits (255 x 127 x 2 > 32767); VNNI sums in 32 bits. False
    where the flags cannot be read (not Linux), as nothing is known there.
    """
    if platform.machine().lower() not in {"x86_64", "amd64", "i686", "i386"}:
        return False
    flags = cpu_flags()
    return "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni"}


# More intra-op threads than this many per core only wait for each other: at 64 threads on 2 cores one image
# took 18x as long, and 100,000 threads never finished (16 GB of thread stacks).
MAX_THREADS_PER_CORE = 4


def too_many_threads(threads: int, processes: int = 1) -> str | None:
    """Why `threads` in each of `processes` processes on this machine (torchrun's ranks) are more than its
    CPUs can use (MAX_THREADS_PER_CORE each), else None."""
    cores = available_cores()
    if threads * processes <= MAX_THREADS_PER_CORE * cores:
        return None
    quota = cgroup_cpu_quota()
    if quota is not None and quota_cores(quota) < affinity_cores():  # `nproc` says more: name what limits it
        cores_said = f"{cpu_cores(cores)} (this cgroup's CPU quota: {quota:g} CPUs)"
    else:
        cores_said = cpu_cores(cores)
    each, in_all = (f" in each of {processes} processes on this machine ({threads * processes} in all)", " in all") if processes > 1 else ("", "")
    return (
        f"threads {threads}{each} on {cores_said}: at most {MAX_THREADS_PER_CORE * cores}{in_all} "
        f"({MAX_THREADS_PER_CORE} per core); threads beyond the cores only wait for each other"
    )


@dataclass(frozen=True)
class SessionSettings:
    """Runtime knobs shared by every session of a bundle."""

    threads: int | None = None  # intra-op threads; None: one per CPU this process may use
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    graph_optimization: str = "all"  # "disabled" | "basic" | "extended" | "all"

    def __post_init__(self) -> None:
        threads = self.threads
        if threads is not None and not is_count(threads):
            raise ValueError(f"threads must be an integer >= 1 (or None for the cores this process may use), got {threads!r}")
        if threads is not None:
            object.__setattr__(self, "threads", int(threads))  # a numpy integer: ONNX Runtime takes ints
            problem = too_many_threads(int(threads))
            if problem:
                raise ValueError(problem)
        if self.graph_optimization not in _LEVELS:
            raise ValueError(f"graph_optimization must be one of {', '.join(_LEVELS)}, got {self.graph_optimization!r}")

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        cores = available_cores()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        elif cores < (os.cpu_count() or 1):
            # Left at 0, ONNX Runtime starts one thread per physical core of the machine and pins each to its
            # core, outside a taskset or cpuset this process was given: one per CPU it may use instead.
            options.intra_op_num_threads = cores
        # One graph runs at a time; inter-op parallelism only adds contention on a shared CPU.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _LEVELS[self.graph_optimization]
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
        return options


class OnnxModel:
    """One ONNX file loaded into an ONNX Runtime session."""

    def __init__(self, path: Path, settings: SessionSettings | None = None, bundle: Path | None = None) -> None:
        """Load `path`. Raises ModelRuntimeError (naming the file) when ONNX Runtime cannot load it."""
        self.path = Path(path)
        self.bundle = Path(bundle) if bundle is not None else self.path.parent
        self.settings = settings or SessionSettings()
        available = set(ort.get_available_providers())
        providers = [p for p in self.settings.providers if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(os.fspath(self.path), self.settings.options(), providers=providers)
        except Exception as exc:  # ORT raises its own Exception subclasses (Fail, InvalidProtobuf, ...)
            raise ModelRuntimeError(f"{self.path}: ONNX Runtime cannot load this model of bundle {self.bundle}: {exc}") from exc
        wanted = self.settings.providers[0]
        if wanted not in self.session.get_providers():
            warnings.warn(f"{self.path}: {wanted} unavailable, running on {self.session.get_providers()[0]}", stacklevel=2)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = {o.name: o for o in self.session.get_outputs()}
        self.input_names = list(self.inputs)
        self.output_names = list(self.outputs)

    def input_dtype(self, name: str) -> type[np.generic]:
        """numpy dtype the model expects for input `name`."""
        kind = self.inputs[name].type
        if kind not in _ORT_TYPES:
            raise ModelRuntimeError(f"{self.path}: input {name} has unsupported type {kind}")
        return _ORT_TYPES[kind]

    def input_shape(self, name: str) -> list[int | str | None]:
        return list(self.inputs[name].shape)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model; returns the requested outputs (all by default) by name.

        Raises ModelRuntimeError naming the model file when ONNX Runtime fails.
        """
        names = list(outputs) if outputs is not None else self.output_names
        try:
            results = self.session.run(names, dict(feeds))
        except Exception as exc:  # noqa: BLE001 - every ORT failure becomes the engine's own error
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in feeds.items())
            raise ModelRuntimeError(f"{self.path} (bundle {self.bundle}): inference failed: {exc} [inputs: {shapes}]") from exc
        return dict(zip(names, results, strict=True))
