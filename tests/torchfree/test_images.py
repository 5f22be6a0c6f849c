"""Image loading: every odd input either becomes RGB or raises a named ImageError. No model needed."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import ImageError
from engine.images import load_image


def test_corpus_each_file_loads_or_names_its_problem(bad_corpus: tuple[Path, dict[str, str | None]]) -> None:
    root, expected = bad_corpus
    for name, problem in expected.items():
        path = root / name
        if problem is None:
            image = load_image(path)
            assert image.mode == "RGB", name
            assert min(image.size) >= 1, name
        else:
            with pytest.raises(ImageError) as info:
                load_image(path)
            message = str(info.value)
            assert problem in message, (name, message)
            assert str(path) in message, (name, message)


def test_pixel_cap_is_checked_before_decoding(tmp_path: Path, png_with_header) -> None:  # noqa: ANN001
    # The header claims 20000x20000 but the pixel data is tiny and broken: only a header check
    # can report "too large" (decoding would report corrupt data instead).
    path = tmp_path / "bomb.png"
    path.write_bytes(png_with_header(9000, 7000))
    with pytest.raises(ImageError, match="9000x7000 = 63.0 MP exceeds the pixel cap of 50.0 MP"):
        load_image(path)
    with pytest.raises(ImageError, match="upload: .* exceeds the pixel cap"):
        load_image(path.read_bytes(), name="upload")
    # Beyond PIL's own bomb limit, Image.open refuses first; named as by our cap, with its size and the way out.
    path.write_bytes(png_with_header(20000, 20000))
    with pytest.raises(ImageError, match=r"20000x20000 = 400.0 MP exceeds the pixel cap of 50.0 MP \(raise it"):
        load_image(path)


def test_pixel_cap_is_configurable(tmp_path: Path) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png", max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageError, match="10000 pixels exceeds the pixel cap of 9999 pixels"):
        load_image(tmp_path / "a.png", max_pixels=9_999)
    Image.new("RGB", (1001, 1000)).save(tmp_path / "b.png")  # 1.0 MP against 1.0 MP: in pixels instead
    with pytest.raises(ImageError, match="1001000 pixels exceeds the pixel cap of 1000000 pixels"):
        load_image(tmp_path / "b.png", max_pixels=1_000_000)


def test_a_cap_above_pillows_own_limit_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PIL refuses images over 2 x MAX_IMAGE_PIXELS in Image.open (179 MP by default); a larger --max-pixels
    # must still decode them. Shown with a small PIL limit instead of a 200 MP file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    Image.new("RGB", (100, 50), (0, 128, 255)).save(tmp_path / "big.png")  # 5000 px > 2 x 1000
    assert np.asarray(load_image(tmp_path / "big.png", max_pixels=10_000))[0, 0].tolist() == [0, 128, 255]
    assert load_image(tmp_path / "big.png", max_pixels=0).size == (100, 50)  # no cap at all
    assert Image.MAX_IMAGE_PIXELS == 1_000  # lifted only while that image was opened
    with pytest.raises(ImageError, match=r"big\.png: image too large to decode safely: 100x50 = 5000 pixels exceeds the pixel cap of 4000 pixels"):
        load_image(tmp_path / "big.png", max_pixels=4_000)  # our cap, above PIL's: ours decides
    with pytest.raises(ImageError, match=r"big\.png: image too large to decode safely: 100x50 = 5000 pixels exceeds the pixel cap of 1500 pixels \(raise it"):
        load_image(tmp_path / "big.png", max_pixels=1_500)  # under PIL's limit: named as by our own cap
    assert Image.MAX_IMAGE_PIXELS == 1_000


def test_alpha_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(load_image(image))
    assert rgb[0, 0].tolist() == [0, 0, 255]
    assert rgb[1, 1].tolist() == [255, 255, 255]
    half = np.asarray(load_image(Image.new("LA", (2, 2), (0, 128))))
    assert 126 <= int(half[0, 0, 0]) <= 128  # black at 50% over white is mid grey


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGB", "RGBA", "RGBa", "RGBX", "LA", "La", "PA", "CMYK", "YCbCr", "LAB", "HSV",
             "I;16", "I;16B", "I", "F"],
)
def test_every_pil_mode_becomes_rgb(mode: str) -> None:
    rgb = load_image(Image.new(mode, (6, 4)))
    assert (rgb.mode, rgb.size) == ("RGB", (6, 4))


def test_a_file_object_is_read_from_where_it_stands_and_the_error_says_so() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    with pytest.raises(ImageError, match=r"read from position \d+; seek\(0\) first .*: empty input"):
        load_image(buffer)  # just written: at its end
    buffer.seek(0)
    assert load_image(buffer).size == (8, 8)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    rgb = np.asarray(load_image(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


def test_integer_images_scale_from_the_white_level_their_file_states(tmp_path: Path) -> None:
    """Pillow opens a 16-bit PGM and a 32-bit TIFF as "I": the file says where white is, so a dark 16-bit
    page stays dark (it was read as 8-bit when no pixel passed 255) and 32 bits are not clipped at 65535."""
    dark = np.array([[0, 200, 255]], dtype=">u2")
    (tmp_path / "dark.pgm").write_bytes(b"P5\n3 1\n65535\n" + dark.tobytes())
    assert Image.open(tmp_path / "dark.pgm").mode == "I"
    assert np.asarray(load_image(tmp_path / "dark.pgm"))[0, :, 0].tolist() == [0, 1, 1]
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)).save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    assert np.asarray(load_image(tmp_path / "wide.tif"))[0, :, 0].tolist() == [0, 128, 255]
    # Unsigned 32 bits (SampleFormat 1; PIL writes 2, so the tag is patched): PIL reads them as int32.
    Image.fromarray(np.array([[0, -(2**31), -1]], dtype=np.int32)).save(tmp_path / "unsigned.tif")
    signed_tag = b"\x53\x01\x03\x00\x01\x00\x00\x00\x02\x00"  # tag 339 SampleFormat, SHORT, 1 value: 2
    data = (tmp_path / "unsigned.tif").read_bytes()
    assert data.count(signed_tag) == 1
    (tmp_path / "unsigned.tif").write_bytes(data.replace(signed_tag, signed_tag[:-2] + b"\x01\x00"))
    assert np.asarray(load_image(tmp_path / "unsigned.tif"))[0, :, 0].tolist() == [0, 128, 255]
    # An "I" image made in memory states nothing: the smallest of 8, 16 and 31 bits holding its brightest pixel.
    assert np.asarray(load_image(Image.fromarray(np.array([[0, 200]], dtype=np.int32))))[0, :, 0].tolist() == [0, 200]
    assert np.asarray(load_image(Image.fromarray(np.array([[0, 2**20]], dtype=np.int32))))[0, :, 0].tolist() == [0, 0]


def test_an_rgb_image_keying_a_colour_as_transparent_is_flattened_on_white_too() -> None:
    keyed = Image.new("RGB", (4, 4), (0, 0, 0))
    keyed.putpixel((0, 0), (10, 200, 30))
    keyed.info["transparency"] = (0, 0, 0)  # as a PNG with a tRNS colour key opens
    rgb = np.asarray(load_image(keyed))
    assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [10, 200, 30]


def test_a_float_image_with_an_infinite_pixel_keeps_its_other_pixels() -> None:
    values = np.array([[0.0, 0.5, 1.0, np.inf, np.nan]], dtype=np.float32)
    grey = np.asarray(load_image(Image.fromarray(values, mode="F")))[0, :, 0].tolist()
    assert grey == [0, 128, 255, 255, 0]  # inf at the top of the finite range, NaN at its bottom
    assert np.asarray(load_image(Image.fromarray(np.full((2, 2), np.inf, np.float32), mode="F"))).max() == 0


def test_postscript_is_not_handed_to_ghostscript(tmp_path: Path) -> None:
    """Pillow opens EPS by running Ghostscript on the file: not for whatever a folder holds."""
    from engine.images import readable_formats

    assert "EPS" not in readable_formats() and "PNG" in readable_formats()
    path = tmp_path / "drawing.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n")
    with pytest.raises(ImageError, match="not an image, or an image format that cannot be read"):
        load_image(path)


def test_an_icon_is_refused_before_its_pixels_are_decoded(tmp_path: Path) -> None:
    """Pillow decodes an ICO's largest image while opening it: a small icon holding a PNG past the pixel cap
    would be decoded whole before the cap could refuse it. Named as an icon, and never opened."""
    import struct

    png = io.BytesIO()
    Image.new("L", (4000, 4000), 255).save(png, format="PNG")  # 16 MP, 16 KB on disk
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 8, len(png.getvalue()), 22)
    path = tmp_path / "scan.png"  # any name: Pillow tells the format from the content
    path.write_bytes(struct.pack("<HHH", 0, 1, 1) + entry + png.getvalue())
    # Opened as an icon it would be decoded first and then refused by the cap ("image too large").
    with pytest.raises(ImageError, match=r"scan.png: an icon file \(ICO/ICNS\), which is not read .*: save the picture as PNG or JPEG"):
        load_image(path, max_pixels=1_000_000)
    from engine.images import readable_formats

    assert not {"ICO", "ICNS"} & set(readable_formats())


def test_palette_with_transparency_and_cmyk() -> None:
    palette = Image.new("P", (3, 3), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    rgb = np.asarray(load_image(palette))
    assert rgb[0, 0].tolist() == [255, 255, 255] and rgb[1, 1].tolist() == [0, 255, 0]
    cmyk = np.asarray(load_image(Image.new("CMYK", (2, 2), (0, 255, 255, 0))))
    assert cmyk[0, 0].tolist() == [255, 0, 0]


def test_a_palette_of_transparent_colours_is_flattened_on_white(tmp_path: Path) -> None:
    """Image.quantize() of an RGBA drawing, or a TGA with a 32-bit colour map: a "P" image whose palette
    colours carry alpha, with no "transparency" key. Its clear red background is white, as in the RGBA."""
    drawing = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    drawing.paste((0, 0, 0, 255), (5, 5, 15, 15))
    quantized = drawing.quantize()
    assert quantized.mode == "P" and "transparency" not in quantized.info
    quantized.save(tmp_path / "drawing.tga")
    expected = np.asarray(load_image(drawing))
    assert expected[0, 0].tolist() == [255, 255, 255] and expected[10, 10].tolist() == [0, 0, 0]
    for image in (quantized, tmp_path / "drawing.tga"):
        assert np.array_equal(np.asarray(load_image(image)), expected)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    assert load_image(buffer.getvalue()).size == (20, 40)


def test_gif_uses_first_frame() -> None:
    frames = [Image.new("L", (8, 8), value) for value in (10, 250)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50)
    gif = Image.open(io.BytesIO(buffer.getvalue()))
    gif.seek(1)  # even a PIL image left on a later frame gives the first one
    for source in (buffer.getvalue(), gif):
        assert int(np.asarray(load_image(source))[0, 0, 0]) < 30


def test_path_str_bytes_and_pil_give_the_same_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    arrays = [
        np.asarray(load_image(source))
        for source in (tmp_path / "x.png", str(tmp_path / "x.png"), (tmp_path / "x.png").read_bytes(), Image.open(tmp_path / "x.png"))
    ]
    for other in arrays[1:]:
        np.testing.assert_array_equal(arrays[0], other)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file whatever its mode; the corpus covers unreadable files with a symlink loop and a FIFO")
def test_permission_denied_is_named(tmp_path: Path) -> None:
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(path)
    path.chmod(0)
    with pytest.raises(ImageError, match="secret.png: (permission denied|cannot open)"):
        load_image(path)


def test_bad_sources_are_named() -> None:
    with pytest.raises(ImageError, match="upload-7: empty input"):
        load_image(b"", name="upload-7")
    with pytest.raises(ImageError, match="no such file"):
        load_image("/definitely/not/here.png")
    with pytest.raises(ImageError, match="unsupported input type int"):
        load_image(42)  # type: ignore[arg-type]


def test_any_path_like_source_is_read_as_a_path(tmp_path: Path) -> None:
    Image.new("RGB", (12, 8), (10, 200, 30)).save(tmp_path / "a.png")
    entry = next(e for e in os.scandir(tmp_path) if e.name == "a.png")  # os.DirEntry is os.PathLike, not a Path
    assert np.array_equal(np.asarray(load_image(entry)), np.asarray(load_image(tmp_path / "a.png")))


def test_a_pil_image_opened_from_a_truncated_file_is_a_named_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:400])
    lazy = Image.open(tmp_path / "cut.png")  # only the header is read here
    with pytest.raises(ImageError, match=r"upload\.png: truncated or corrupt image data"):
        load_image(lazy, name="upload.png")


def test_heic_photos_are_read_with_pillow_heif_or_named(tmp_path: Path) -> None:
    try:
        import pillow_heif
    except ImportError:
        pillow_heif = None
    from engine.folder import is_image_name

    # Canon's and Fujifilm's cameras name their HEIF photos .HIF: walked as images, not left out.
    assert all(is_image_name(Path(name)) for name in ("IMG_0001.HEIC", "a.heif", "DSCF0001.HIF"))
    path = tmp_path / "IMG_0001.HEIC"
    if pillow_heif is None:  # the engine-only install: say what to install
        path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
        with pytest.raises(ImageError, match=r"IMG_0001\.HEIC: a HEIC/HEIF photo, which needs pillow-heif"):
            load_image(path)
        return
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = (200, 40, 40)
    pillow_heif.from_bytes(mode="RGB", size=(64, 48), data=pixels.tobytes()).save(path, quality=-1)  # lossless
    image = load_image(path)
    assert image.size == (64, 48) and image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - pixels).mean() < 4  # HEVC is lossy in chroma even at -1
    damaged = tmp_path / "IMG_0002.HEIC"  # a HEIF header that pillow-heif cannot read either
    damaged.write_bytes(path.read_bytes()[:24] + np.random.default_rng(0).bytes(200))
    with pytest.raises(ImageError, match=r"IMG_0002\.HEIC: truncated or corrupt HEIC/HEIF image data"):
        load_image(damaged)


@pytest.mark.parametrize("mode", ["1", "I;16"])
def test_a_grey_level_keyed_transparent_is_white_in_one_bit_and_sixteen_bit_pngs(mode: str) -> None:
    values = np.zeros((4, 4), dtype=np.uint16 if mode == "I;16" else bool)
    values[0, 0] = 1 if mode == "1" else 40000
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG", transparency=0)  # tRNS: grey level 0 is transparent
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
    rgb = np.asarray(load_image(buffer.getvalue()))
    assert rgb[1, 1].tolist() == [255, 255, 255]  # keyed: onto white, as alpha is
    assert rgb[0, 0].tolist() == ([255] * 3 if mode == "1" else [156] * 3)  # the opaque pixel keeps its grey


def test_a_pil_image_whose_file_was_closed_is_named_as_closed(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as lazy:  # the block ends before the pixels were read
        assert lazy.size == (8, 8)
    with pytest.raises(ImageError, match="the PIL image was closed before it was captioned"):
        load_image(lazy)
    with open(tmp_path / "a.png", "rb") as handle:
        from_file = Image.open(handle)
    with pytest.raises(ImageError, match="the PIL image was closed before it was captioned"):
        load_image(from_file)


def _png(width: int, height: int, depth: int, colour_type: int, rows: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """A PNG written chunk by chunk (Pillow does not write 16-bit RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    body = [chunk(b"IHDR", header), *(chunk(kind, data) for kind, data in chunks), chunk(b"IDAT", zlib.compress(rows))]
    return b"\x89PNG\r\n\x1a\n" + b"".join(body) + chunk(b"IEND", b"")


def test_a_sixteen_bit_rgb_png_keying_a_colour_whitens_that_colour_only(tmp_path: Path) -> None:
    # Pillow keeps the 16-bit key but only the high bytes of the pixels: matched as it stands, the key
    # (1, 2, 3) whitened the pixels of 8-bit (1, 2, 3) and left the transparent ones black.
    samples = np.zeros((2, 3, 3), dtype=">u2")
    samples[0] = (1, 2, 3)  # keyed: transparent
    samples[1, 0] = (256 + 1, 512 + 2, 768 + 3)  # 8-bit (1, 2, 3): opaque
    samples[1, 1] = (300, 40000, 65535)
    rows = b"".join(b"\x00" + row.tobytes() for row in samples)
    png = _png(3, 2, 16, 2, rows, (b"tRNS", b"\x00\x01\x00\x02\x00\x03"))
    rgb = np.asarray(load_image(png))
    assert rgb[0].tolist() == [[255, 255, 255]] * 3
    assert rgb[1].tolist() == [[1, 2, 3], [1, 156, 255], [0, 0, 0]]
    # A PIL image opened from the file, as training's loader passes it, gives the same pixels; the caller's
    # image keeps its own.
    path = tmp_path / "keyed.png"
    path.write_bytes(png)
    with Image.open(path) as lazy:
        assert np.asarray(load_image(lazy)).tolist() == rgb.tolist()
        assert np.asarray(lazy)[0, 0].tolist() == [0, 0, 0] and "transparency" in lazy.info


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_a_warnings_hook_can_tell_which_image_pillow_warns_about(tmp_path: Path) -> None:
    # Raw, "UserWarning: Corrupt EXIF data" named a line of Pillow's source, not the photo. A hook (as
    # `edlight caption` installs) asks image_being_loaded(), which is per thread: recording the warnings
    # with catch_warnings instead left the process's warnings broken when threads loaded images at once.
    import threading
    import warnings

    from engine.images import image_being_loaded

    damaged = tmp_path / "phone.jpg"
    Image.new("RGB", (6, 4), (90, 90, 90)).save(damaged, exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    seen: list[tuple[str | None, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_: seen.append((image_being_loaded(), str(message)))
        assert np.asarray(load_image(damaged))[0, 0].tolist() == [90, 90, 90]
        assert np.asarray(load_image(damaged.read_bytes(), name="photo 2"))[0, 0].tolist() == [90, 90, 90]
    assert [name for name, text in seen if "Corrupt EXIF" in text] == [str(damaged), "photo 2"]
    assert image_being_loaded() is None
    hook = warnings.showwarning
    filters = list(warnings.filters)
    threads = [threading.Thread(target=lambda: [load_image(damaged) for _ in range(30)]) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.showwarning is hook and warnings.filters == filters
    signalling_nan = np.full((2, 2), 0.5, dtype=np.float32)
    signalling_nan.view(np.uint32)[0, 0] = 0x7F800001  # numpy warned as it widened one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_image(Image.fromarray(signalling_nan, mode="F")))[1, 1].tolist() == [128] * 3


def test_every_one_byte_corruption_of_an_avif_is_captioned_or_named() -> None:
    # Pillow's AVIF plugin raises RuntimeError ("Failed to decode image: Not implemented"), which escaped.
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow reads no AVIF")
    buffer = io.BytesIO()
    Image.new("RGBA", (24, 24), (0, 0, 0, 0)).save(buffer, "AVIF")
    good = buffer.getvalue()
    named = 0
    for offset in range(len(good)):
        damaged = bytearray(good)
        damaged[offset] ^= 0xFF
        try:
            load_image(bytes(damaged))
        except ImageError:
            named += 1
    assert named > 0
    with pytest.raises(ImageError, match="a damaged AVIF image: its header cannot be read"):
        load_image(good[:300], name="cut.avif")


def test_a_hand_made_transparency_of_the_wrong_kind_is_a_named_error() -> None:
    image = Image.new("RGB", (4, 4))
    image.info["transparency"] = b"\x00"  # PIL wants a colour: it raised TypeError
    with pytest.raises(ImageError, match="<PIL image>: cannot convert image mode RGB"):
        load_image(image)
