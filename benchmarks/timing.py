"""What one timed run of a system returns, and the interface every system module implements."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass
class RunTiming:
    """Seconds for one batch through one system (whole batch, not per image)."""

    batch_size: int
    preprocess_s: float  # pixels -> flattened patches
    encoder_s: float  # the vision encoder, timed inside generate (hooks), same call as total_s
    decode_s: float  # everything after the encoder: decoding steps, logits, tokens -> text
    total_s: float  # end to end: preprocessing + generate + detokenising
    decode_steps: int  # decoder calls actually made (forced generation: the token count)
    captions: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SystemSpec:
    """What a worker needs to load one system; JSON-serialisable so it crosses the process boundary."""

    system: str
    model_path: str  # checkpoint (torch), Optimum export dir (optimum) or bundle (engine)
    processor_path: str  # where the processor lives (checkpoint for torch/optimum, bundle for the engine)
    threads: int
    batch_size: int  # a worker serves one batch size (its peak memory is that batch's)
    tokens: int
    max_patches: int
    images: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class System(Protocol):
    """A loaded runtime. `run` captions `images` as one batch with `tokens` forced new tokens."""

    def run(self, images: list[Any]) -> RunTiming: ...


def load_system(spec: SystemSpec) -> System:
    """Import the module of `spec.system` (only then) and load the model it names."""
    if spec.system == "torch":
        from benchmarks.torch_system import TorchSystem

        return TorchSystem(spec)
    if spec.system == "optimum":
        from benchmarks.optimum_system import OptimumSystem

        return OptimumSystem(spec)
    if spec.system in ("engine", "engine-int8"):
        from benchmarks.engine_system import EngineSystem

        return EngineSystem(spec)
    raise ValueError(f"unknown system {spec.system!r}")
