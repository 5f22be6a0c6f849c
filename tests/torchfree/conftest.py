"""Fixtures for the torch-free suite: a bundle that exists without torch, and a bad-input corpus.

Only engine, numpy, PIL, pytest and the standard library may be imported here.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from engine.bundle import MANIFEST_NAME
from engine.captioner import DEFAULT_BUNDLE


@pytest.fixture(scope="session")
def engine_bundle() -> Path:
    """The bundle shipped in engine/default_bundle (or $EDLIGHT_TEST_BUNDLE, for development)."""
    override = os.environ.get("EDLIGHT_TEST_BUNDLE")
    if override:
        return Path(override)
    if not (DEFAULT_BUNDLE / MANIFEST_NAME).is_file():
        pytest.skip(
            f"no default bundle at {DEFAULT_BUNDLE} (build it with `make model`, or set EDLIGHT_TEST_BUNDLE); "
            "the torch-free end-to-end tests need a bundle that exists without torch"
        )
    return DEFAULT_BUNDLE


def _png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by a tiny (wrong) IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)


def build_corpus(root: Path) -> dict[str, str | None]:
    """Write the bad/odd-input corpus under `root`.

    Returns {relative file name: expected error fragment, or None if it must be captioned}.
    Runs as root in CI, so "unreadable" uses faults root cannot bypass: a symlink loop and a FIFO.
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}

    (root / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty file"

    buffer = io.BytesIO()
    _photo(200, 150, 1).save(buffer, "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    expected["truncated.jpg"] = "truncated or corrupt"

    buffer = io.BytesIO()
    _photo(200, 150, 2).save(buffer, "PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    expected["truncated.png"] = "truncated or corrupt"

    (root / "notes.jpg").write_text("this is a text file, not a photo\n")
    expected["notes.jpg"] = "not an image"

    # A good PNG but for one checksum, of a comment chunk Pillow reads while opening: it then says only
    # that it cannot identify the file, while the bytes say PNG.
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "scanned")
    _photo(60, 40, 4).save(buffer, "PNG", pnginfo=info)
    data = bytearray(buffer.getvalue())
    crc = data.index(b"tEXt") + 4 + len(b"Comment\x00scanned")
    data[crc] ^= 0xFF
    (root / "bad_checksum.png").write_bytes(bytes(data))
    expected["bad_checksum.png"] = "a damaged PNG image"

    (root / "bomb.png").write_bytes(_png_with_header(20000, 20000))
    expected["bomb.png"] = "too large"

    sixteen = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(sixteen).save(root / "gray16.png")
    expected["gray16.png"] = None

    _photo(60, 40, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / "palette.png")
    expected["palette.png"] = None

    _photo(64, 64, 4).convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    expected["cmyk.jpg"] = None

    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "one_pixel.png")
    expected["one_pixel.png"] = None

    _photo(10000, 10, 5).save(root / "wide_10000x10.png")
    expected["wide_10000x10.png"] = None

    frames = [Image.new("P", (32, 32), i * 40) for i in range(3)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected["animated.gif"] = None

    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.save(root / "transparent.png")
    expected["transparent.png"] = None

    (root / "folder.jpg").mkdir()  # a folder named like an image: walked like any folder
    _photo(32, 32, 6).save(root / "folder.jpg" / "inside.png")
    expected["folder.jpg/inside.png"] = None

    os.symlink(root / "does-not-exist.png", root / "broken_link.png")
    expected["broken_link.png"] = "broken symbolic link"

    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    expected["loop_a.png"] = "cannot access"
    expected["loop_b.png"] = "cannot access"

    os.mkfifo(root / "pipe.png")
    expected["pipe.png"] = "not a regular file"

    _photo(48, 32, 7).save(root / "good.webp", "WEBP")
    expected["good.webp"] = None
    return expected


@pytest.fixture(scope="session")
def png_with_header():  # noqa: ANN201 - returns the helper
    """The bomb-shaped PNG writer, for tests that need their own."""
    return _png_with_header


@pytest.fixture()
def bad_corpus(tmp_path: Path) -> tuple[Path, dict[str, str | None]]:
    root = tmp_path / "corpus"
    return root, build_corpus(root)
