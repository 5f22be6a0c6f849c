"""Safe image loading: every input becomes an 8-bit RGB PIL image or a named `ImageError`.

Images are read once, here, at the edge of the engine:

- the pixel count is checked from the header *before* any pixel is decoded (a pixel cap,
  default 50 MP), so a decompression bomb costs nothing;
- EXIF orientation is applied (phones store portrait photos sideways);
- every mode becomes RGB: alpha is flattened onto white (a transparent PNG of a drawing
  should look like the drawing on paper, not on black), palettes are expanded, 16-bit and
  float images are scaled down to 8 bits instead of being clipped, CMYK is converted;
- only the first frame of an animated GIF/WebP/TIFF is used;
- HEIC/HEIF photos (iPhones) are read when pillow-heif is installed, else named as such;
- zero-byte, truncated, non-image, directory, broken-symlink, unreadable and non-regular
  files each raise `ImageError` with a message naming the file and the problem.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from struct import error as struct_error  # raised by a few PIL plugins on garbage headers
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.errors import ImageError, install_hint

# About 50 megapixels: a 8000x6000 photo fits, a 100k x 100k PNG bomb does not.
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes] | Image.Image

# ISO base media "ftyp" brands of HEIF still images (AVIF, also HEIF-based, Pillow reads itself).
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
# What PIL raises for truncated and corrupt data ("image file is truncated", "broken data stream") and for
# malformed headers, while decoding: each becomes a named ImageError. RuntimeError: Pillow's AVIF plugin
# ("Failed to decode frame 0: Decoding of color planes failed").
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct_error, RuntimeError)
# First bytes of formats Pillow reads, to tell a damaged image from a file that is not one.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
# ISO base media "ftyp" brands of AVIF images and image sequences.
AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Why a HEIC photo cannot be read here: said the same way by the engine and by training's data check.
HEIF_MISSING = f"a HEIC/HEIF photo, which needs pillow-heif to be read ({install_hint('heif')})"


def describe(source: object, index: int | None = None) -> str:
    """A short human name for an image source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source) or "<empty path>"
    where = f" #{index}" if index is not None else ""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = source.nbytes if isinstance(source, memoryview) else len(source)
        return f"<bytes{where}, {size} B>"
    if isinstance(source, Image.Image):
        return f"<PIL image{where}>"
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return name if isinstance(name, str) else f"<file object{where}>"
    return f"<{type(source).__name__}{where}>"


def load_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Load a path, the bytes of an encoded image, a binary file object or a PIL image as 8-bit RGB.

    `max_pixels` caps width*height (checked before decoding; 0 or negative disables the cap).
    `name` is used in error messages instead of the path (e.g. for bytes inputs).
    Raises ImageError naming the source for anything that is not a decodable, safe image. While it
    loads, `image_being_loaded()` in this thread names it (for a warnings hook: Pillow's warnings name a
    line of Pillow's source, not the image).
    """
    label = name or describe(source)
    previous = getattr(_loading, "label", None)
    _loading.label = label
    try:
        return _load(source, max_pixels, label)
    finally:
        _loading.label = previous


_loading = threading.local()


def image_being_loaded() -> str | None:
    """The name of the image `load_image` is loading in this thread, or None. A `warnings.showwarning` hook
    runs in the thread that warned, so it can say which image a Pillow warning (a damaged EXIF block, odd
    TIFF tags) is about; `edlight caption` does."""
    return getattr(_loading, "label", None)


def _load(source: ImageSource, max_pixels: int, label: str) -> Image.Image:
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, label)
        try:
            image = _first_frame(source)
            keyed_16_bit = _keys_16_bit_rgb(image)  # opened lazily from a file (training's loader does)
            image.load()  # an image opened lazily from a damaged file fails here, not in the model
            filename = getattr(image, "filename", None)
            if keyed_16_bit and isinstance(filename, str) and filename:
                image = image.copy()  # the caller's image is left as it was
                with open(filename, "rb") as handle:
                    _whiten_16_bit_key(image, handle)
        except (*DECODE_ERRORS, AssertionError) as exc:
            # Closed before its pixels were read: im.close() (ValueError), the end of a `with Image.open()`
            # block (Pillow asserts it still has a file), or the file object it was opened from closed.
            if isinstance(exc, AssertionError) or (isinstance(exc, ValueError) and "closed" in str(exc)):
                raise ImageError(f"{label}: the PIL image was closed before it was captioned (keep it open, or pass its path)") from exc
            raise ImageError(f"{label}: truncated or corrupt image data ({exc})") from exc
        return to_rgb(image, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(f"{label}: empty input (0 bytes)")
        return _decode(io.BytesIO(data), max_pixels, label)
    if hasattr(source, "read"):
        try:
            # Read from where it stands, as PIL does; where that is says why nothing (or no image) came.
            position = source.tell() if getattr(source, "seekable", lambda: False)() else 0  # type: ignore[union-attr]
            data = source.read()
        except (OSError, ValueError) as exc:  # ValueError: a closed file
            raise ImageError(f"{label}: cannot read the file object: {exc}") from exc
        if not isinstance(data, bytes):
            raise ImageError(f"{label}: file object gives {type(data).__name__}, not bytes; open it in binary mode ('rb')")
        if position:
            label = f"{label} (read from position {position}; seek(0) first to read it whole)"
        return _load(data, max_pixels, label)
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):
            raise ImageError(f"{label}: empty path")
        path = Path(os.fsdecode(source))
        _check_path(path, label)
        try:
            handle = open(path, "rb")
        except OSError as exc:
            raise ImageError(f"{label}: cannot open: {exc.strerror or exc}") from exc
        with handle:
            return _decode(handle, max_pixels, label)
    hint = "; for an array of pixels, pass PIL.Image.fromarray(array)" if hasattr(source, "__array_interface__") else ""
    raise ImageError(
        f"{label}: unsupported input type {type(source).__name__} (expected a path, bytes, a binary file object or a PIL image{hint})"
    )


def _check_path(path: Path, label: str) -> None:
    """Refuse, with a precise reason, anything at `path` that is not a non-empty regular file."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise ImageError(f"{label}: broken symbolic link (points to {os.readlink(path)!r}, which does not exist)") from exc
        raise ImageError(f"{label}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"{label}: permission denied") from exc
    except OSError as exc:  # ELOOP (symlink loop), ENAMETOOLONG, EIO, ...
        raise ImageError(f"{label}: cannot access: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"{label}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        # Opening a FIFO or a device would block or read forever.
        raise ImageError(f"{label}: not a regular file (a pipe, socket or device)")
    if info.st_size == 0:
        raise ImageError(f"{label}: empty file (0 bytes)")


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: image has no pixels ({width}x{height})")
    if max_pixels > 0 and width * height > max_pixels:
        pixels, cap = _megapixels(width * height), _megapixels(max_pixels)
        if pixels == cap:  # "1.0 MP exceeds 1.0 MP": exact counts say it
            pixels, cap = f"{width * height} pixels", f"{max_pixels} pixels"
        raise ImageError(
            f"{label}: image too large to decode safely: {width}x{height} = {pixels} "
            f"exceeds the pixel cap of {cap} (raise it: --max-pixels, or max_pixels=)"
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _open_checked(handle: IO[bytes], max_pixels: int, label: str) -> Image.Image:
    image = open_lazily(handle)  # our own cap decides, below
    _check_pixels(image.size, max_pixels, label)
    keyed_16_bit = _keys_16_bit_rgb(image)
    image.load()  # decodes the first frame only
    if keyed_16_bit:
        _whiten_16_bit_key(image, handle)
    return image


def _keys_16_bit_rgb(image: Image.Image) -> bool:
    """Whether `image`, opened and not yet loaded, is a 16-bit RGB PNG with a tRNS colour key."""
    return image.format == "PNG" and image.mode == "RGB" and "transparency" in image.info and any(
        len(tile) > 3 and tile[3] == "RGB;16B" for tile in getattr(image, "tile", ())  # its raw mode (Pillow < 11: a tuple)
    )


def _whiten_16_bit_key(image: Image.Image, handle: IO[bytes]) -> None:
    """Paint white the pixels of a 16-bit RGB PNG that its tRNS chunk keys as transparent, and drop the key.

    Pillow keeps only the high byte of each 16-bit sample but the key in 16-bit units, so it would match
    other pixels (8-bit (1, 2, 3)) and not the transparent ones. The low bytes come from decoding the file
    again as little-endian samples, which takes the second byte of each pair.
    """
    key = image.info.pop("transparency")
    handle.seek(0)
    low = Image.open(handle, formats=["PNG"])
    low.tile = [(*tile[:3], "RGB;16L", *tile[4:]) if type(tile) is tuple else tile._replace(args="RGB;16L")  # type: ignore[misc]
                for tile in low.tile]  # Pillow < 11: plain tuples
    low.load()
    values = np.asarray(image).astype(np.uint16) << 8 | np.asarray(low)
    transparent = np.all(values == np.asarray(key, dtype=np.uint16), axis=-1)
    image.paste((255, 255, 255), mask=Image.fromarray(transparent.astype(np.uint8) * 255))


# Formats Pillow has readers for that are not read, none of them student work: EPS, because Pillow reads it by
# running another program on the file (Ghostscript, a PostScript interpreter, on whatever a folder holds under an
# image's name); ICO and ICNS, because their pixel count is not known before their pixels are: Pillow decodes an
# icon's largest image while opening it, and an ICNS entry's PNG need not be the size its table says, so a 250 KB
# icon holding a 15000x15000 PNG took 310 MB before the pixel cap could refuse it.
UNREAD_FORMATS = frozenset({"EPS", "ICO", "ICNS"})
ICON_SIGNATURES = (b"\x00\x00\x01\x00", b"icns")  # ICO, ICNS (Windows and macOS icons)
# Said the same way by the engine and by training's data check.
ICON_REFUSED = "an icon file (ICO/ICNS), which is not read (its size cannot be checked before its pixels are decoded): save the picture as PNG or JPEG"


_BOMB_WARNING_LOCK = threading.Lock()


def open_lazily(source: str | os.PathLike[str] | IO[bytes]) -> Image.Image:
    """`Image.open(source)` of any readable format (pixels not decoded yet), without PIL's bomb warning: the
    caller checks the size against its own cap, and the warning would only print Pillow's source line first.
    Raises what Image.open raises.

    The lock: catch_warnings saves and restores the process's filters, and threads leaving it out of order
    (a Captioner serves several) left its filter behind. Only the header is read under it.
    """
    with _BOMB_WARNING_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source, formats=readable_formats())


def readable_formats() -> list[str]:
    """Every format Pillow has a reader for (plugins registered later, as HEIF, included), in its own
    detection order, less UNREAD_FORMATS."""
    Image.init()
    return [name for name in Image.ID if name not in UNREAD_FORMATS]


@contextlib.contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (179 MP) in Image.open, whatever our cap says.
    Lifted only while one such image is opened again, so that our cap decides (`_check_pixels`: it reads
    the size from the header and refuses before decoding; the lock: the limit is a module global). Meanwhile other threads of the process open images
    without PIL's own check too; the engine's loads keep their cap, code of its host's own does not."""
    with _PILLOW_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = limit


_PILLOW_LIMIT_LOCK = threading.Lock()


def _decode(handle: IO[bytes], max_pixels: int, label: str, heif_tried: bool = False) -> Image.Image:
    try:
        try:
            image = _open_checked(handle, max_pixels, label)
        except Image.DecompressionBombError:
            # Again without PIL's limit: our cap decides, and under a cap below PIL's limit it refuses the
            # image from its header, with its size and how to raise the cap.
            handle.seek(0)
            with _pillow_limit_lifted():
                image = _open_checked(handle, max_pixels, label)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        if _is_heif(handle):
            if heif_tried:  # pillow-heif could not read it either
                raise ImageError(f"{label}: truncated or corrupt HEIC/HEIF image data") from exc
            if enable_heif():
                handle.seek(0)
                return _decode(handle, max_pixels, label, heif_tried=True)
            raise ImageError(f"{label}: {HEIF_MISSING}") from exc
        if _is_icon(handle):
            raise ImageError(f"{label}: {ICON_REFUSED}") from exc
        if (kind := _signature(handle)) is not None:  # Pillow drops the reason (a bad chunk checksum, say)
            raise ImageError(f"{label}: a damaged {kind} image: its header cannot be read") from exc
        raise ImageError(f"{label}: not an image, or an image format that cannot be read") from exc
    except DECODE_ERRORS as exc:
        raise ImageError(f"{label}: truncated or corrupt image data ({exc})") from exc
    except MemoryError as exc:
        raise ImageError(f"{label}: not enough memory to decode this image") from exc
    return to_rgb(image, label)


def _head(handle: IO[bytes]) -> bytes:
    """The first 12 bytes of `handle` (fewer for a shorter file; none if it cannot be read)."""
    try:
        handle.seek(0)
        return handle.read(12)
    except (OSError, ValueError):
        return b""


def _signature(handle: IO[bytes]) -> str | None:
    """The format a file's first bytes announce (PNG, JPEG, GIF, WebP, AVIF, TIFF), or None."""
    head = _head(handle)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp" and head[8:12] in AVIF_BRANDS:
        return "AVIF"
    return next((kind for magic, kind in SIGNATURES if head.startswith(magic)), None)


def _is_heif(handle: IO[bytes]) -> bool:
    head = _head(handle)
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


def is_heif_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` starts like a HEIC/HEIF still image."""
    return _file_starts_like(path, _is_heif)


def is_icon_file(path: str | os.PathLike[str]) -> bool:
    """Whether the file at `path` starts like an ICO or ICNS icon (not read: UNREAD_FORMATS)."""
    return _file_starts_like(path, _is_icon)


def _is_icon(handle: IO[bytes]) -> bool:
    return _head(handle).startswith(ICON_SIGNATURES)


def _file_starts_like(path: str | os.PathLike[str], test: Callable[[IO[bytes]], bool]) -> bool:
    """`test` of the file at `path` (False if it cannot be read, or is not a regular file: opening a FIFO would
    wait forever)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as handle:
            return test(handle)
    except OSError:
        return False


@functools.cache
def enable_heif() -> bool:
    """Teach PIL to open HEIF through pillow-heif, once, if it is installed (True then). For code that opens
    images with PIL itself (training's loader) and must read what the engine reads."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _first_frame(image: Image.Image) -> Image.Image:
    if getattr(image, "n_frames", 1) > 1 and image.tell() != 0:
        image.seek(0)
    return image


def to_rgb(image: Image.Image, label: str = "<image>") -> Image.Image:
    """Apply EXIF orientation and convert any PIL mode to 8-bit RGB (alpha flattened onto white)."""
    full_scale = _declared_full_scale(image)  # read from the file's image: the transposed copy has no format
    try:
        image = ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose an otherwise good image
        pass
    try:
        return _convert(image, full_scale)
    except (OSError, ValueError, TypeError) as exc:  # TypeError: a hand-made "transparency" of the wrong kind
        raise ImageError(f"{label}: cannot convert image mode {image.mode} to RGB ({exc})") from exc


def _convert(image: Image.Image, full_scale: int | None = None) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:  # an RGB PNG may key one colour as transparent
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image)
        grey = _to_uint8(values, mode, full_scale)
        key = image.info.get("transparency")  # a 16-bit PNG may key one grey level as transparent
        if isinstance(key, int) and mode != "F":
            grey[values == key] = 255  # onto white, as alpha is
        return Image.fromarray(grey).convert("RGB")
    # has_transparency_data: alpha bands, a "transparency" key, or a palette of RGBA colours (a TGA's 32-bit
    # colour map, Image.quantize() of an RGBA image), which carries no "transparency" key.
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode in ("P", "L", "1", "RGB") and image.has_transparency_data)
    if has_alpha:
        if mode == "La":  # premultiplied: PIL converts it only to LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _declared_full_scale(image: Image.Image) -> int | None:
    """The white level an integer ("I") image's file states, else None. PNG and PPM/PGM widen 16-bit data
    into "I" (PGM rescaled from its maxval to 0..65535); a TIFF states its bits per sample."""
    if image.mode != "I":
        return None
    if image.format in ("PNG", "PPM"):
        return 65535
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None:
        bits, sample_format = tags.get(258), tags.get(339)
        bits = bits[0] if isinstance(bits, tuple) and bits else bits
        signed = (sample_format[0] if isinstance(sample_format, tuple) and sample_format else sample_format) == 2
        if isinstance(bits, int) and 8 < bits <= 32:
            return 2 ** (bits - signed) - 1
    return None


def _to_uint8(array: np.ndarray, mode: str, full_scale: int | None = None) -> np.ndarray:
    """Scale 16-bit, 32-bit integer and float greyscale pixels to 0..255 (PIL would clip them).

    Integers are scaled from `full_scale` (the file's stated white level) when given, else from the
    smallest of 8, 16 and 31 bits that holds the brightest pixel."""
    if mode == "F":
        with np.errstate(invalid="ignore"):  # a signalling NaN warns as it widens; it is a NaN all the same
            values = array.astype(np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return np.zeros(values.shape, dtype=np.uint8)
        # The range of the finite pixels: one inf pixel must not flatten the rest to black. Infinities
        # take the ends of that range, NaN its low end.
        low, high = float(finite.min()), float(finite.max())
        values = np.where(np.isnan(values), low, np.clip(values, low, high))
        # Floats are usually 0..1 or 0..255; anything else is stretched to its own range.
        if 0.0 <= low and high <= 1.0:
            scaled = values * 255.0
        elif 0.0 <= low and high <= 255.0:
            scaled = values
        else:
            scaled = (values - low) * (255.0 / (high - low or 1.0))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    values = array.astype(np.int64)
    if full_scale is not None and full_scale > 2**31 - 1:
        values = np.bitwise_and(values, 0xFFFFFFFF)  # an unsigned 32-bit file: PIL's int32 "I" wraps its upper half negative
    if mode.startswith("I;16"):
        full_scale = 65535
    elif full_scale is None:
        high = int(values.max()) if values.size else 0
        full_scale = 255 if high <= 255 else 65535 if high <= 65535 else 2**31 - 1
    return np.clip(np.rint(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)
