"""The edlight engine (`engine.Captioner`) on a bundle, fp32 or int8.

Its own `Timings` split preprocessing, encoder and decoding; the total is the
wall time of `caption()` around them. Imports nothing but the engine, so this
system runs on an engine-only install.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.timing import RunTiming, SystemSpec


class EngineSystem:
    def __init__(self, spec: SystemSpec) -> None:
        from engine.captioner import Captioner

        self.spec = spec
        self.captioner = Captioner(
            bundle=spec.model_path,
            threads=spec.threads,
            batch_size=spec.batch_size,
            num_beams=1,
            max_new_tokens=spec.tokens,
            min_new_tokens=spec.tokens,
        )

    def run(self, images: list[Any]) -> RunTiming:
        self.captioner.reset_timings()
        start = time.perf_counter()
        captions = self.captioner.caption(images)
        end = time.perf_counter()
        t = self.captioner.timings
        return RunTiming(
            batch_size=len(images),
            preprocess_s=float(t.preprocess_s),
            encoder_s=float(t.encoder_s),
            decode_s=end - start - float(t.preprocess_s) - float(t.encoder_s),
            total_s=end - start,
            # Steps per model run: int8 bundles run one image at a time, so a batch makes several runs.
            decode_steps=round(t.decode_steps / max(t.model_runs, 1)),
            captions=list(captions),
            encoder_patches=self._encoder_patches(images),
        )

    def _encoder_patches(self, images: list[Any]) -> list[int] | None:
        """Each image's own patch count where the captioner runs the encoder on it without padding (its grid,
        as the processor lays it out), so the encoder's GFLOP/s counts only the work it did."""
        from engine.images import to_rgb
        from engine.preprocess import grid_size

        if not self.captioner.trims_padding:
            return None
        config = self.captioner.patch_config
        upright = [to_rgb(image) for image in images]  # as the captioner turns them (EXIF orientation)
        return [rows * cols for rows, cols in (grid_size(image.height, image.width, config) for image in upright)]
