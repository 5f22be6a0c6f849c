"""PyTorch eager fp32 `model.generate`: what the seed project ran.

The encoder is timed inside `generate` with forward hooks (same call, no extra
encoder pass); decoder calls are counted the same way.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.timing import RunTiming, SystemSpec


class TorchSystem:
    def __init__(self, spec: SystemSpec) -> None:
        import torch
        from transformers import Pix2StructForConditionalGeneration, Pix2StructProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(spec.threads)
        self.torch = torch
        self.spec = spec
        self.processor = Pix2StructProcessor.from_pretrained(spec.processor_path)
        self.model = Pix2StructForConditionalGeneration.from_pretrained(
            spec.model_path, torch_dtype=torch.float32
        ).eval()
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

    def run(self, images: list[Any]) -> RunTiming:
        self._encoder_s, self._decoder_calls = 0.0, 0
        start = time.perf_counter()
        inputs = self.processor(images=images, return_tensors="pt", max_patches=self.spec.max_patches)
        preprocessed = time.perf_counter()
        with self.torch.inference_mode():
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
