"""The one decode function: every image mode -> RGB uint8 with the right values, EXIF orientation, errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from semspai.store.images import ImageDecodeError, ImageTooLargeError, decode_image, jpeg_frame, probe_image
from tests.conftest import XMP_ROTATED, encode, random_photo, with_adobe

W, H = 40, 24  # non-square, so a wrong orientation or a transposed array shows


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def grey3(a8: np.ndarray) -> np.ndarray:
    return np.repeat(a8[..., None], 3, axis=2)


def png_bytes(width: int, height: int, depth: int, colour_type: int, rows: np.ndarray) -> bytes:
    """A PNG written by hand (filter 0 on every row), for bit depths Pillow cannot save (48/64-bit colour)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.fixture
def rgb() -> np.ndarray:
    return random_photo(W, H, seed=7)


def check_rgb(out: np.ndarray, expected: np.ndarray) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (H, W, 3)
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("TIFF", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_rgb_formats_round_trip(rgb, fmt, kw):
    check_rgb(decode_image(encode(rgb, fmt, **kw)), rgb)


def test_jpeg_decodes_like_pil(rgb):
    data = encode(rgb, "JPEG", quality=90)
    check_rgb(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_greyscale_l_and_bilevel(rgb):
    grey = rgb[..., 1].copy()
    check_rgb(decode_image(encode(grey, "PNG")), grey3(grey))
    bits = grey > 128
    check_rgb(decode_image(save(Image.fromarray(bits), "PNG")), grey3(np.where(bits, 255, 0).astype(np.uint8)))


def test_la_drops_alpha(rgb):
    grey, alpha = rgb[..., 0], rgb[..., 2]
    data = save(Image.fromarray(np.stack([grey, alpha], axis=2), "LA"), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"
    check_rgb(decode_image(data), grey3(grey))


def test_rgba_drops_alpha_without_compositing(rgb):
    alpha = np.zeros((H, W, 1), np.uint8)  # fully transparent: compositing would turn everything one colour
    data = encode(np.concatenate([rgb, alpha], axis=2), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "RGBA"
    check_rgb(decode_image(data), rgb)


def palette_image(transparency: int | None) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(palette.flatten().tolist())
    kw = {} if transparency is None else {"transparency": transparency}
    return save(img, "PNG", **kw), palette[index]


@pytest.mark.parametrize("transparency", [None, 5])
def test_palette_with_and_without_transparency(transparency):
    data, expected = palette_image(transparency)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P"
    assert ("transparency" in img.info) == (transparency is not None)
    # a transparent palette entry keeps its stored colour (alpha dropped, not composited)
    check_rgb(decode_image(data), expected)


def test_cmyk_pure_inks():
    # (C, M, Y, K) -> RGB for inks at 0 or 255, where every CMYK->RGB convention agrees
    cases = {
        (0, 0, 0, 0): (255, 255, 255),
        (255, 0, 0, 0): (0, 255, 255),
        (0, 255, 0, 0): (255, 0, 255),
        (0, 0, 255, 0): (255, 255, 0),
        (0, 0, 0, 255): (0, 0, 0),
        (255, 255, 255, 0): (0, 0, 0),
    }
    cmyk = np.zeros((H, W, 4), np.uint8)
    expected = np.zeros((H, W, 3), np.uint8)
    for i, (ink, colour) in enumerate(cases.items()):
        cmyk[:, i :: len(cases)] = ink
        expected[:, i :: len(cases)] = colour
    data = save(Image.fromarray(cmyk, "CMYK"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    check_rgb(decode_image(data), expected)


def test_cmyk_jpeg_is_rgb():
    cmyk = np.zeros((H, W, 4), np.uint8)
    cmyk[..., 1] = 255  # magenta
    out = decode_image(save(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert (
        abs(int(out[..., 0].mean()) - 255) <= 3
        and int(out[..., 1].mean()) <= 3
        and abs(int(out[..., 2].mean()) - 255) <= 3
    )


def sixteen_bit(seed: int, channels: int | None = None) -> np.ndarray:
    shape = (H, W) if channels is None else (H, W, channels)
    return np.random.default_rng(seed).integers(0, 65536, shape, dtype=np.uint16)


def test_16bit_greyscale_png_keeps_top_byte():
    a16 = sixteen_bit(1)
    data = save(Image.fromarray(a16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    check_rgb(decode_image(data), grey3((a16 >> 8).astype(np.uint8)))


def test_i_mode_tiff_keeps_top_byte_of_16_bits():
    a = sixteen_bit(2).astype(np.int32)
    data = save(Image.fromarray(a, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    check_rgb(decode_image(data), grey3((a >> 8).astype(np.uint8)))


def test_f_mode_tiff_above_1_is_rounded_and_clipped_to_0_255():
    a = np.random.default_rng(4).uniform(-50, 300, (H, W)).astype(np.float32)
    a[0, 0] = np.nan
    data = save(Image.fromarray(a, "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    want = np.clip(np.rint(a.astype(np.float64)), 0, 255)
    want[0, 0] = 0
    check_rgb(decode_image(data), grey3(want.astype(np.uint8)))


def test_f_mode_tiff_within_0_1_is_scaled_by_255():
    a = np.random.default_rng(7).uniform(0, 1, (H, W)).astype(np.float32)
    data = save(Image.fromarray(a, "F"), "TIFF")
    got = decode_image(data)
    want = np.rint(a.astype(np.float64) * 255).astype(np.uint8)
    check_rgb(got, grey3(want))
    assert got.mean() > 100  # not the black image a 0..255 reading gives
    a[0, 0], a[0, 1] = np.inf, -np.inf  # infinities do not move the range: still 0..1, scaled
    want[0, 0], want[0, 1] = 255, 0
    check_rgb(decode_image(save(Image.fromarray(a, "F"), "TIFF")), grey3(want))


def test_i_mode_png_is_16_bit_even_when_dark(monkeypatch):
    """Older Pillow releases open 16-bit PNGs as "I", not "I;16": still the top byte, however dark."""
    a16 = np.random.default_rng(10).integers(0, 256, (H, W)).astype(np.uint16)
    data = save(Image.fromarray(a16), "PNG")
    real_open = Image.open

    def open_as_i(*args, **kwargs):  # what such a release hands back
        img = real_open(*args, **kwargs)
        img.load()
        as_i = img.convert("I")
        as_i.format = img.format
        return as_i

    monkeypatch.setattr(Image, "open", open_as_i)
    check_rgb(decode_image(data), grey3((a16 >> 8).astype(np.uint8)))


def test_i_mode_tiff_holding_8_bit_values_is_not_black():
    a = np.random.default_rng(8).integers(0, 256, (H, W)).astype(np.int32)
    data = save(Image.fromarray(a, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    check_rgb(decode_image(data), grey3(a.astype(np.uint8)))


def test_dark_16_bit_png_still_keeps_top_byte():
    a16 = np.random.default_rng(9).integers(0, 256, (H, W)).astype(np.uint16)  # a 16-bit image that is dark
    data = save(Image.fromarray(a16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    check_rgb(decode_image(data), grey3((a16 >> 8).astype(np.uint8)))


@pytest.mark.parametrize("channels,colour_type", [(3, 2), (4, 6)])
def test_48_and_64_bit_colour_png_keeps_top_byte(channels, colour_type):
    a16 = sixteen_bit(5, channels)
    data = png_bytes(W, H, 16, colour_type, a16.astype(">u2"))
    check_rgb(decode_image(data), (a16[..., :3] >> 8).astype(np.uint8))


def test_16_bit_grey_alpha_png():
    a16 = sixteen_bit(6, 2)
    data = png_bytes(W, H, 16, 4, a16.astype(">u2"))
    check_rgb(decode_image(data), grey3((a16[..., 0] >> 8).astype(np.uint8)))


# EXIF orientation -> the numpy transform that shows the stored pixels upright
ORIENTATIONS = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated 90 degrees counter-clockwise: turn clockwise
    8: lambda a: np.rot90(a, 1),
}


def with_orientation(rgb: np.ndarray, orientation: int, fmt: str) -> bytes:
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = orientation
    return save(img, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_png_lossless(rgb, orientation):
    data = with_orientation(rgb, orientation, "PNG")
    expected = ORIENTATIONS[orientation](rgb)
    np.testing.assert_array_equal(decode_image(data), expected)
    info = probe_image(data)
    assert (info.height, info.width) == expected.shape[:2]


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_jpeg(rgb, orientation):
    data = with_orientation(rgb, orientation, "JPEG")
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # PIL alone does not rotate
    assert stored.shape == (H, W, 3)
    expected = ORIENTATIONS[orientation](stored)
    out = decode_image(data)
    assert out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, expected)
    info = probe_image(data)
    assert (info.width, info.height, info.format, info.mode) == (expected.shape[1], expected.shape[0], "JPEG", "RGB")
    if orientation == 6:
        assert (info.width, info.height) == (H, W)


def test_probe_reports_stored_mode_and_format():
    info = probe_image(save(Image.fromarray(sixteen_bit(1)), "PNG"))
    assert (info.width, info.height, info.format) == (W, H, "PNG")
    assert info.mode.startswith("I")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "WEBP"])
@pytest.mark.parametrize("fn", [decode_image, probe_image])
def test_truncated_images_raise(fn, fmt):
    data = encode(random_photo(64, 48, seed=1), fmt)
    with pytest.raises(ImageDecodeError, match="truncated|not a readable image"):
        fn(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [b"\x00" * 100, b"text, not an image\n", b"\x89PNG\r\n\x1a\n" + b"\x01" * 64, b"\xff\xd8\xff\xe0garbage"],
    ids=["zeros", "text", "png-header", "jpeg-header"],
)
def test_corrupt_bytes_raise_a_stable_message(data):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    msg = str(info.value)
    assert "not a readable image" in msg or "truncated" in msg
    # the reason lands in index.json: it must not vary between runs (no object addresses)
    assert " at 0x" not in msg


def test_corrupt_pixel_data_after_a_valid_header(rgb):
    data = bytearray(encode(rgb, "PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 50] = b"\x00" * 50
    with pytest.raises(ImageDecodeError):
        decode_image(bytes(data))


def test_zero_bytes_raise():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        probe_image(b"")


@pytest.mark.parametrize("fn", [decode_image, probe_image])
def test_pixel_limit_names_the_size_and_the_limit(fn, rgb):
    data = encode(rgb, "PNG")
    with pytest.raises(ImageTooLargeError, match=rf"exceeds the limit of {W * H - 1} pixels$") as info:
        fn(data, max_pixels=W * H - 1)
    assert f"{W}x{H}" in str(info.value)
    assert isinstance(info.value, ImageDecodeError)  # callers that skip unreadable images skip these too
    assert fn(data, max_pixels=W * H) is not None  # the limit is inclusive
    assert fn(data, max_pixels=None) is not None


def test_raised_pixel_limit_overrides_pils_own_guard(monkeypatch, rgb):
    # PIL refuses images above twice its MAX_IMAGE_PIXELS by itself; a larger --max-pixels must still win
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = encode(rgb, "PNG")
    check_rgb(decode_image(data, max_pixels=W * H), rgb)
    assert probe_image(data, max_pixels=None).width == W
    with pytest.raises(ImageTooLargeError, match="exceeds the limit"):
        decode_image(data, max_pixels=W * H - 1)


def _jpeg(rgb: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_jpeg_frame_reads_what_pil_reads_from_the_markers() -> None:
    rgb = random_photo(120, 70, 3)
    variants = {
        "xmp-rotated": _jpeg(rgb, xmp=XMP_ROTATED),  # no EXIF: PIL reads the orientation from the XMP
        "adobe-rgb": with_adobe(_jpeg(rgb), 0),
        "baseline": _jpeg(rgb),
        "progressive": _jpeg(rgb, progressive=True),
        "444": _jpeg(rgb, subsampling=0),
        "grey": _jpeg(rgb, "L"),
        "cmyk": _jpeg(rgb, "CMYK"),
        "exif-rotated": _jpeg(rgb, exif=_exif(6)),
        "exif-upright": _jpeg(rgb, exif=_exif(1)),
        "icc+comment": _jpeg(rgb, icc_profile=b"\0" * 300, comment=b"made here"),
        "optimized": _jpeg(rgb, optimize=True, quality=60),
    }
    for name, data in variants.items():
        frame = jpeg_frame(data)
        with Image.open(io.BytesIO(data)) as im:
            assert frame is not None, name
            assert (frame.width, frame.height) == im.size == (120, 70), name  # as stored: before rotation
            assert frame.components == len(im.getbands()), name
            assert frame.has_exif == bool(im.getexif()), name
            assert frame.adobe_transform == im.info.get("adobe_transform"), name
            assert frame.precision == im.bits == 8, name
            assert (frame.marker == 0xC2) == bool(im.info.get("progressive")), name


def test_jpeg_frame_is_none_where_the_markers_do_not_reach_a_frame() -> None:
    data = _jpeg(random_photo(64, 48, 4))
    sof = data.index(b"\xff\xc0")
    png = encode(random_photo(8, 8, 5), "PNG")
    for bad in (b"", b"\xff\xd8", data[:sof], data[: sof + 6], png, b"\xff\xd8" + bytes(range(256)) * 4):
        assert jpeg_frame(bad) is None
