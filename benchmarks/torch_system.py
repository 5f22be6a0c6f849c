"""PyTorch eager fp32 `model.generate`: what the seed project ran.

The encoder is timed inside `generate` with forward hooks (same call, no extra
encoder pass); decoder calls are counted the same way.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.timing import GenerateSystem, SystemSpec


class TorchSystem(GenerateSystem):
    def __init__(self, spec: SystemSpec) -> None:
        import torch
        from transformers import Pix2StructProcessor
        from transformers.utils import logging as hf_logging

        from train.checkpoint import load_model_weights

        hf_logging.set_verbosity_error()
        torch.set_num_threads(spec.threads)
        self.torch = torch
        self.spec = spec
        self.processor = Pix2StructProcessor.from_pretrained(spec.processor_path)
        # float32 (transformers' default dtype); weights that leave tensors out are refused, not timed at random
        self.model = load_model_weights(Path(spec.model_path)).eval()
        self._encoder_s = 0.0
        self._encoder_start = 0.0
        self._decoder_calls = 0
        encoder = self.model.get_encoder()
        encoder.register_forward_pre_hook(self._encoder_starts)
        encoder.register_forward_hook(self._encoder_ends)
        self.model.decoder.register_forward_pre_hook(self._decoder_called)

    def _encoder_starts(self, *_: Any) -> None:
        self._encoder_start = time.perf_counter()

    def _encoder_ends(self, *_: Any) -> None:
        self._encoder_s += time.perf_counter() - self._encoder_start

    def _decoder_called(self, *_: Any) -> None:
        self._decoder_calls += 1

    def _generate_context(self) -> Any:
        return self.torch.inference_mode()
