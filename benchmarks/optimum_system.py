"""Optimum `ORTModelForPix2Struct.generate` on a plain Optimum export (no edlight graph rewrites).

The encoder session is timed inside `generate` by wrapping the encoder's
`forward` (Optimum's encoder `__call__` goes through it); decoder calls are
counted the same way.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.timing import GenerateSystem, SystemSpec


class OptimumSystem(GenerateSystem):
    def __init__(self, spec: SystemSpec) -> None:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForPix2Struct
        from transformers import Pix2StructProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        self.spec = spec
        self.processor = Pix2StructProcessor.from_pretrained(spec.processor_path)
        self.model = ORTModelForPix2Struct.from_pretrained(
            spec.model_path, session_options=options, provider="CPUExecutionProvider", use_cache=True
        )
        self._encoder_s = 0.0
        self._decoder_calls = 0
        self._wrap_encoder(self.model.encoder)
        for decoder in {id(d): d for d in (self.model.decoder, getattr(self.model, "decoder_with_past", None)) if d}.values():
            self._wrap_decoder(decoder)

    def _wrap_encoder(self, encoder: Any) -> None:
        forward = encoder.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self._encoder_s += time.perf_counter() - start

        encoder.forward = timed

    def _wrap_decoder(self, decoder: Any) -> None:
        forward = decoder.forward

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._decoder_calls += 1
            return forward(*args, **kwargs)

        decoder.forward = counted
