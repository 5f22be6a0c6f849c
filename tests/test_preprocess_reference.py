"""engine.preprocess against transformers' Pix2StructImageProcessor, on varied images.

Stated tolerance (standardized pixel values are roughly in [-3, 3]):
- grid (rows, cols), attention mask and row/column ids: exactly equal;
- pixel features: max |difference| <= 1e-3, except the extreme-aspect images (a 10-pixel side
  upsampled to 16 while the other side has ~10,000 pixels) where it is <= 5e-3;
- mean |difference| <= 3e-5 (2e-4 for the extreme-aspect images).
The residual comes from torch computing the antialiased filter's sample positions in float32
(off by ~1e-3 pixel at position ~20,000); PIL computes them in double.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.images import load_image
from engine.preprocess import PatchConfig, image_to_patches

transformers = pytest.importorskip("transformers")


def smooth(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1) + 1, max(width // 8, 1) + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def noise(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def gray(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8))


def flat(height: int, width: int, seed: int) -> Image.Image:
    return Image.new("RGB", (width, height), (seed * 40 % 256, 128, 200))


def transparent(height: int, width: int, seed: int) -> Image.Image:
    image = noise(height, width, seed).convert("RGBA")
    alpha = np.zeros((height, width), dtype=np.uint8)
    alpha[: height // 2] = 255
    image.putalpha(Image.fromarray(alpha))
    return image


CASES = [
    # (height, width, kind): tiny, square, portrait, landscape, extreme aspect, large photo
    (1, 1, noise), (5, 300, noise), (16, 16, smooth), (37, 91, gray), (480, 640, smooth),
    (640, 480, noise), (1000, 800, gray), (10, 10000, noise), (10000, 10, smooth),
    (2048, 2048, smooth), (3000, 2000, noise), (64, 64, flat), (120, 90, transparent),
]


@pytest.mark.parametrize("max_patches", [128, 2048])
@pytest.mark.parametrize(("height", "width", "kind"), CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_patches_match_transformers(height: int, width: int, kind, max_patches: int) -> None:  # noqa: ANN001
    reference = transformers.Pix2StructImageProcessor(max_patches=max_patches)
    # Both sides see the engine loader's RGB image (alpha on white); transformers' own convert("RGB")
    # would drop alpha onto black, which is not what we want to compare.
    image = load_image(kind(height, width, 7))
    # channels_last: transformers guesses wrong for images 1 or 3 pixels high.
    expected = reference(images=image, return_tensors="np", input_data_format="channels_last")
    ours = image_to_patches(image, PatchConfig(max_patches=max_patches))

    ref_patches = expected["flattened_patches"][0]
    np.testing.assert_array_equal(ours.attention_mask, expected["attention_mask"][0].astype(np.int64))
    np.testing.assert_array_equal(ours.flattened_patches[:, :2], ref_patches[:, :2])
    diff = np.abs(ours.flattened_patches[:, 2:] - ref_patches[:, 2:])
    extreme = max(height, width) / min(height, width) > 500
    assert diff.max() <= (5e-3 if extreme else 1e-3), diff.max()
    assert diff.mean() <= (2e-4 if extreme else 3e-5), diff.mean()
