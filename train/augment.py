"""Training-only augmentation for photos and scans of paper, in PIL.

Each transform is small on purpose: the captions name digits that must stay
legible after the processor shrinks the image to its patch budget. Evaluation
never goes through this module.

Randomness comes only from the `numpy.random.Generator` passed in, so the
training loop can seed it per (seed, epoch, example) and a resumed run sees
exactly the images an uninterrupted run would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (each drawn uniformly)."""

    max_rotation: float = 3.0  # degrees, either way: a paper lying slightly askew
    min_scale: float = 0.9  # < 1 crops the margins (zoom in)
    max_scale: float = 1.12  # > 1 adds a paper-coloured margin (zoom out)
    max_aspect: float = 0.05  # relative stretch of one axis: perspective-ish
    brightness: float = 0.2  # factor in [1-b, 1+b]
    contrast: float = 0.25  # factor in [1-c, 1+c]
    jpeg_prob: float = 0.5  # chance of a JPEG re-encode
    jpeg_quality: tuple[int, int] = (35, 92)


DEFAULT = AugmentConfig()


def _paper_colour(image: Image.Image) -> tuple[int, int, int]:
    """Median colour of the four corners: what a rotation or margin should be filled with."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    k = max(1, min(h, w) // 20)
    corners = np.concatenate(
        [
            arr[:k, :k].reshape(-1, 3),
            arr[:k, -k:].reshape(-1, 3),
            arr[-k:, :k].reshape(-1, 3),
            arr[-k:, -k:].reshape(-1, 3),
        ]
    )
    r, g, b = (int(v) for v in np.median(corners, axis=0))
    return r, g, b


def augment(image: Image.Image, rng: np.random.Generator, cfg: AugmentConfig = DEFAULT) -> Image.Image:
    """A randomly perturbed copy of the RGB `image` (rotation, scale/crop, aspect, light, JPEG)."""
    image = image.convert("RGB")
    fill = _paper_colour(image)

    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    if abs(angle) > 0.2:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=fill)

    w, h = image.size
    scale = float(rng.uniform(cfg.min_scale, cfg.max_scale))
    aspect = 1.0 + float(rng.uniform(-cfg.max_aspect, cfg.max_aspect))
    canvas_w, canvas_h = max(1, round(w * scale * aspect)), max(1, round(h * scale / aspect))
    # Place the page at a random offset on a canvas of the new size: a smaller canvas crops the
    # margins, a larger one adds paper around the page.
    dx = int(rng.integers(min(0, canvas_w - w), max(0, canvas_w - w) + 1))
    dy = int(rng.integers(min(0, canvas_h - h), max(0, canvas_h - h) + 1))
    canvas = Image.new("RGB", (canvas_w, canvas_h), fill)
    canvas.paste(image, (dx, dy))
    image = canvas

    image = ImageEnhance.Brightness(image).enhance(1.0 + float(rng.uniform(-cfg.brightness, cfg.brightness)))
    image = ImageEnhance.Contrast(image).enhance(1.0 + float(rng.uniform(-cfg.contrast, cfg.contrast)))

    if rng.random() < cfg.jpeg_prob:
        buf = io.BytesIO()
        image.save(
            buf, format="JPEG", quality=int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        )
        buf.seek(0)
        image = Image.open(buf)
        image.load()
        image = image.convert("RGB")
    return image
