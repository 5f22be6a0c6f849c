"""What one timed run of a system returns, and the interface every system module implements."""

from __future__ import annotations

import contextlib
import time
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
    # Patches each image's encoder pass ran over, for systems that cut padding off (the engine on bundles with
    # a dynamic patch axis); None: every image ran at the padded max_patches.
    encoder_patches: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def combined(cls, runs: list[RunTiming]) -> RunTiming:
        """Several batches run one after another, as one run over all their images (batch_size: the images)."""
        patches = [run.encoder_patches for run in runs]
        return cls(
            batch_size=sum(run.batch_size for run in runs),
            preprocess_s=sum(run.preprocess_s for run in runs),
            encoder_s=sum(run.encoder_s for run in runs),
            decode_s=sum(run.decode_s for run in runs),
            total_s=sum(run.total_s for run in runs),
            decode_steps=max(run.decode_steps for run in runs),
            captions=[caption for run in runs for caption in run.captions],
            encoder_patches=None if any(p is None for p in patches) else [n for p in patches if p for n in p],
        )


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
    # A timed run captions this many images, in batches of batch_size (0: one batch). The batch-scaling
    # comparison gives the smaller batch size the larger one's images, so both time the same images.
    images_per_run: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class System(Protocol):
    """A loaded runtime. `run` captions `images` as one batch with `tokens` forced new tokens."""

    def run(self, images: list[Any]) -> RunTiming: ...


class GenerateSystem:
    """Shared `run` of the transformers-style systems (torch, Optimum): processor, then `model.generate`.

    Subclasses load `processor` and `model` and keep `_encoder_s` / `_decoder_calls` up to date from
    inside `generate` (hooks or wrapped forwards).
    """

    spec: SystemSpec
    processor: Any
    model: Any
    _encoder_s: float
    _decoder_calls: int

    def _generate_context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def run(self, images: list[Any]) -> RunTiming:
        self._encoder_s, self._decoder_calls = 0.0, 0
        start = time.perf_counter()
        inputs = self.processor(images=images, return_tensors="pt", max_patches=self.spec.max_patches)
        preprocessed = time.perf_counter()
        with self._generate_context():
            ids = self.model.generate(
                flattened_patches=inputs["flattened_patches"],
                attention_mask=inputs["attention_mask"],
                max_new_tokens=self.spec.tokens,
                min_new_tokens=self.spec.tokens,
                num_beams=1,
                do_sample=False,
            )
        captions = self.processor.batch_decode(ids, skip_special_tokens=True)
        end = time.perf_counter()
        return RunTiming(
            batch_size=len(images),
            preprocess_s=preprocessed - start,
            encoder_s=self._encoder_s,
            decode_s=end - preprocessed - self._encoder_s,
            total_s=end - start,
            decode_steps=self._decoder_calls,
            captions=captions,
        )


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
