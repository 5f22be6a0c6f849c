"""What a benchmark run measures, and which systems this machine can run."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import is_installed

# name -> (one-line description, modules it needs)
SYSTEMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("PyTorch eager fp32, transformers model.generate", ("torch", "transformers")),
    "optimum": ("Optimum ORTModelForPix2Struct.generate, fp32 (plain Optimum export)",
                ("torch", "transformers", "optimum.onnxruntime", "onnxruntime")),
    "engine": ("edlight engine, fp32 bundle", ("engine.captioner", "onnxruntime")),
    "engine-int8": ("edlight engine, int8 bundle", ("engine.captioner", "onnxruntime")),
}
SIZES = ("tiny", "base")
BENCH_IMAGES = 8  # distinct images fed to the systems (batches cycle through them)
DEFAULT_TOKENS = 20  # forced length: min_new_tokens = max_new_tokens, so every system does the same work


def default_cache() -> Path:
    """Where generated benchmark models, bundles and images are kept: EDLIGHT_BENCH_CACHE, else
    ~/.cache/edlight/bench. A variable set but empty, as an unset variable's expansion leaves it, counts as not
    set rather than the current folder. Raises ValueError when it is not set and the user has no home folder
    (HOME unset for a user without a passwd entry: `docker run --user 12345`)."""
    if chosen := os.environ.get("EDLIGHT_BENCH_CACHE"):
        return Path(chosen)
    try:
        if os.environ.get("HOME") == "":  # set but empty, which Path.home() reads as "/": as if not set
            import pwd

            try:
                home = Path(pwd.getpwuid(os.getuid()).pw_dir or "/")
            except KeyError:
                raise RuntimeError("no passwd entry") from None
        else:
            home = Path.home()
        if home == Path("/"):  # a system user's "home" (or an empty one): never a place for a cache
            raise RuntimeError("no home")
        return home / ".cache" / "edlight" / "bench"
    except RuntimeError:  # Path.home() without HOME or a passwd entry
        raise ValueError(
            "no home folder to keep the benchmark's models in (HOME is not set, or empty, or /, and this user has no "
            "other): pass --cache-dir, or set EDLIGHT_BENCH_CACHE"
        ) from None


@dataclass
class BenchSettings:
    """One run of `edlight bench`."""

    size: str = "base"
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    threads: int = 1
    repeats: int = 3  # timed runs per system and batch size, after `warmup` untimed ones
    warmup: int = 1
    tokens: int = DEFAULT_TOKENS
    out: Path = Path("bench-results")
    cache_dir: Path = field(default_factory=default_cache)
    ceiling_seconds: float = 3.0
    interleave: bool = True  # rotate systems within each repeat; False (or too little memory) runs them in turn

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {', '.join(SIZES)}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        # Ascending, so a worker's peak memory grows with the batch (see runner).
        self.batch_sizes = sorted(set(self.batch_sizes))
        if self.threads < 1 or self.repeats < 1 or self.warmup < 0 or self.tokens < 1:
            raise ValueError("threads, repeats and tokens must be >= 1 and warmup >= 0")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["cache_dir"] = str(self.cache_dir)
        return data


def missing_modules(system: str) -> list[str]:
    """Modules `system` needs that cannot be imported here (checked without importing them)."""
    return [module for module in SYSTEMS[system][1] if not is_installed(module)]
