"""Patch extraction invariants (the comparison with transformers is tests/test_preprocess_reference.py)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from engine.errors import BundleError
from engine.preprocess import PatchConfig, grid_size, image_to_patches, stack, standardization


@pytest.mark.parametrize(
    ("height", "width", "max_patches", "grid"),
    [
        (480, 640, 2048, (39, 52)),
        (1, 1, 2048, (45, 45)),
        (10, 10000, 2048, (1, 1431)),
        (10000, 10, 2048, (1431, 1)),
        (300, 5, 128, (87, 1)),
        (16, 16, 128, (11, 11)),
    ],
)
def test_grid_matches_the_transformers_arithmetic(height: int, width: int, max_patches: int, grid: tuple[int, int]) -> None:
    rows, cols = grid_size(height, width, PatchConfig(max_patches=max_patches))
    assert (rows, cols) == grid
    assert rows * cols <= max_patches


def test_patch_layout_ids_padding_and_mask() -> None:
    config = PatchConfig(max_patches=9)  # scale sqrt(9/8): a 2x4 grid, the image keeps its size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))
    patches = image_to_patches(image, config)
    assert (patches.rows, patches.cols) == (2, 4)
    flat = patches.flattened_patches
    assert flat.shape == (9, 2 + 16 * 16 * 3) and flat.dtype == np.float32
    assert flat[:8, 0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert flat[:8, 1].tolist() == [1, 2, 3, 4, 1, 2, 3, 4]
    assert not flat[8:].any()
    assert patches.attention_mask.tolist() == [1] * 8 + [0]
    # No resize is needed here, so patch (row 2, col 3) is exactly that block, standardized,
    # flattened as (pixel row, pixel column, channel).
    pixels = np.asarray(image).astype(np.float64)
    mean, std = pixels.mean(), pixels.std()
    block = (pixels[16:32, 32:48] - mean) / std
    np.testing.assert_allclose(flat[6, 2:], block.reshape(-1), rtol=0, atol=1e-5)


def test_standardization_is_exact_and_guards_flat_images() -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    mean, std = standardization(Image.fromarray(pixels))
    assert mean == pytest.approx(pixels.astype(np.float64).mean(), rel=1e-12)
    assert std == pytest.approx(pixels.astype(np.float64).std(), rel=1e-12)
    grey = pixels[..., 0]
    assert standardization(Image.fromarray(grey)) == (pytest.approx(grey.mean(), rel=1e-12), pytest.approx(grey.std(), rel=1e-12))
    flat = np.full((10, 10, 3), 7, dtype=np.uint8)
    assert standardization(Image.fromarray(flat)) == (7.0, pytest.approx(1 / np.sqrt(300)))
    assert np.isfinite(image_to_patches(Image.fromarray(flat), PatchConfig(max_patches=8)).flattened_patches).all()
    with pytest.raises(ValueError, match="mode RGBA"):
        standardization(Image.new("RGBA", (4, 4)))


def test_standardization_copies_no_pixels() -> None:
    # A photo's statistics must not cost a multiple of the photo: numpy's bincount widened every channel
    # value to int64 (8x the image, over 1 GB for a 48-megapixel photo in every preprocessing thread).
    image = Image.new("RGB", (2000, 1500), (10, 200, 30))  # 9 MB of pixels
    tracemalloc.start()
    try:
        standardization(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"standardization allocated {peak} bytes for a 9 MB image"


def test_stack_and_config_from_bundle_files() -> None:
    config = PatchConfig.from_preprocessor_config({"patch_size": {"height": 16, "width": 16}, "max_patches": 2048}, max_patches=64)
    assert config.max_patches == 64 and config.depth == 770
    items = [image_to_patches(Image.new("RGB", (w, 20), "white"), config) for w in (20, 90)]
    flat, mask = stack(items)
    assert flat.shape == (2, 64, 770) and mask.shape == (2, 64) and mask.dtype == np.int64
    with pytest.raises(BundleError, match="VQA"):
        PatchConfig.from_preprocessor_config({"is_vqa": True})
