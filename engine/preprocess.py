"""Pix2Struct image preprocessing in numpy/PIL, reproducing transformers' `Pix2StructImageProcessor`.

The reference (transformers 4.57, `image_processing_pix2struct.py`) does, per RGB image:

1. per-image standardization over all pixels and channels: ``(x - mean) / max(std, 1/sqrt(N))``;
2. the largest aspect-preserving grid of 16x16 patches that fits `max_patches`:
   ``scale = sqrt(max_patches * (ph / H) * (pw / W))``,
   ``rows = clamp(floor(scale * H / ph), 1, max_patches)``, likewise ``cols``;
3. a resize to ``(rows*ph, cols*pw)`` with torch's bilinear interpolation, ``antialias=True``;
4. patches in row-major order, each flattened as (patch row, patch column, channel), prefixed with
   its 1-based row and column ids, zero-padded to `max_patches` rows; the attention mask marks the
   real patches.

Here the resize runs first on the raw 0..255 values with PIL's float ("F" mode) bilinear filter,
which is the same separable triangle filter torch's antialiased kernel was ported from, and the
standardization is applied after it. Both are affine maps with weights summing to one, so the order
does not change the result beyond float rounding; resizing first avoids materialising a float copy
of a large photo. The mean and standard deviation are computed exactly from a histogram of the
uint8 pixels. tests/test_preprocess_reference.py measures the difference against transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from engine.errors import BundleError, is_count


@dataclass(frozen=True)
class PatchConfig:
    """How images become encoder inputs; read from a bundle's preprocessor config and manifest."""

    max_patches: int
    patch_height: int = 16
    patch_width: int = 16
    do_normalize: bool = True

    @property
    def depth(self) -> int:
        """Features per patch: row id, column id, then patch_height*patch_width*3 pixel values."""
        return 2 + self.patch_height * self.patch_width * 3

    @classmethod
    def from_preprocessor_config(cls, config: dict[str, Any], max_patches: int | None = None) -> PatchConfig:
        """Build from `preprocessor_config.json`; `max_patches` (the manifest's) wins over the file's.

        Raises BundleError for settings this engine cannot reproduce (VQA header rendering).
        """
        if config.get("is_vqa"):
            raise BundleError("VQA Pix2Struct models (is_vqa=true, header text rendering) are not supported")
        size = config.get("patch_size") or {"height": 16, "width": 16}
        patches = max_patches if max_patches is not None else int(config.get("max_patches", 2048))
        return cls(
            max_patches=int(patches),
            patch_height=int(size["height"]),
            patch_width=int(size["width"]),
            do_normalize=bool(config.get("do_normalize", True)),
        )


@dataclass
class Patches:
    """One image as the encoder sees it."""

    flattened_patches: np.ndarray  # float32 [max_patches, depth]
    attention_mask: np.ndarray  # int64 [max_patches], 1 for real patches, 0 for padding
    rows: int
    cols: int


def grid_size(height: int, width: int, config: PatchConfig) -> tuple[int, int]:
    """(rows, cols) of the patch grid transformers picks for an image of this size."""
    ph, pw, max_patches = config.patch_height, config.patch_width, config.max_patches
    scale = math.sqrt(max_patches * (ph / height) * (pw / width))
    rows = max(min(math.floor(scale * height / ph), max_patches), 1)
    cols = max(min(math.floor(scale * width / pw), max_patches), 1)
    return rows, cols


# Rows of the row/column position tables when config.json states none (transformers' default seq_len).
DEFAULT_POSITION_LIMIT = 4096


def position_limit_of(config: dict[str, Any]) -> int:
    """Rows of a Pix2Struct config's row/column position tables (vision_config.seq_len; transformers'
    default when unset). Raises BundleError for a value that is no whole number of at least 2."""
    vision = config.get("vision_config")
    limit = vision.get("seq_len") if isinstance(vision, dict) else None
    if limit is None:
        return DEFAULT_POSITION_LIMIT
    if not is_count(limit, 2):
        raise BundleError(f"vision_config.seq_len must be an integer >= 2, got {limit!r}")
    return int(limit)


def position_error(width: int, height: int, config: PatchConfig, position_limit: int) -> str | None:
    """Why a `width` x `height` image cannot be embedded, or None: row and column ids index position tables
    of `position_limit` rows, so a grid side must stay below it. Only a model with max_patches at or beyond
    its table (a grid side is at most max_patches) meets a long, thin image it cannot embed."""
    rows, cols = grid_size(height, width, config)
    if max(rows, cols) < position_limit:
        return None
    return (
        f"a {width}x{height} image becomes a {rows}x{cols} patch grid, beyond this model's "
        f"{position_limit - 1} row/column positions (aspect ratio too extreme)"
    )


def standardization(image: Image.Image) -> tuple[float, float]:
    """Mean and adjusted standard deviation of an 8-bit RGB or L image, as TF's per_image_standardization.

    Computed in float64 from PIL's 256-bin histogram: exact, and no copy of the image at all (a numpy
    bincount widens every channel value to int64, 8x a 48-megapixel photo's own size).
    """
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"standardization needs an 8-bit RGB or L image, got mode {image.mode}")
    counts = np.asarray(image.histogram(), dtype=np.float64).reshape(-1, 256).sum(axis=0)
    values = np.arange(256, dtype=np.float64)
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    std = math.sqrt(float((counts * (values - mean) ** 2).sum() / total))
    return mean, max(std, 1.0 / math.sqrt(total))


def resize_bilinear_antialias(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize an RGB image to float32 [height, width, 3] with an antialiased bilinear (triangle) filter.

    Works channel by channel in PIL's 32-bit float mode, so no rounding to uint8 happens.
    """
    channels = []
    for band in image.split():
        resized = band.convert("F").resize((width, height), Image.Resampling.BILINEAR)
        channels.append(np.asarray(resized, dtype=np.float32))
    return np.stack(channels, axis=-1)


def image_to_patches(image: Image.Image, config: PatchConfig) -> Patches:
    """Turn an RGB PIL image (see engine.images.load_image) into Pix2Struct encoder inputs."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    ph, pw = config.patch_height, config.patch_width
    rows, cols = grid_size(height, width, config)

    resized = resize_bilinear_antialias(image, rows * ph, cols * pw)
    if config.do_normalize:
        mean, std = standardization(image)
        resized -= np.float32(mean)
        resized /= np.float32(std)

    count = rows * cols
    # [rows*ph, cols*pw, 3] -> [rows, cols, ph, pw, 3] -> [rows*cols, ph*pw*3]
    patches = resized.reshape(rows, ph, cols, pw, 3).transpose(0, 2, 1, 3, 4).reshape(count, ph * pw * 3)
    out = np.zeros((config.max_patches, config.depth), dtype=np.float32)
    out[:count, 0] = np.repeat(np.arange(1, rows + 1, dtype=np.float32), cols)
    out[:count, 1] = np.tile(np.arange(1, cols + 1, dtype=np.float32), rows)
    out[:count, 2:] = patches
    mask = np.zeros(config.max_patches, dtype=np.int64)
    # transformers derives the mask as `row.sum() != 0`; the 1-based ids make that true for exactly
    # the real patches.
    mask[:count] = 1
    return Patches(flattened_patches=out, attention_mask=mask, rows=rows, cols=cols)


def stack(items: list[Patches]) -> tuple[np.ndarray, np.ndarray]:
    """Batch patches: float32 [B, max_patches, depth] and int64 [B, max_patches]."""
    return (
        np.stack([p.flattened_patches for p in items]),
        np.stack([p.attention_mask for p in items]),
    )
