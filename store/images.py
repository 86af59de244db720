"""The one image decode function every stage uses: bytes -> RGB uint8, orientation applied."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# 16384 x 16384: far above any photo or generator output, far below what exhausts memory on decode.
DEFAULT_MAX_PIXELS = 268_435_456
# The decoder's identity, recorded wherever pixels feed a cached result (a change here invalidates caches).
DECODER_ID = "pil-exif-rgb8-v2"  # v2: 32-bit integer and float images by their range
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


class ImageDecodeError(ValueError):
    """The bytes are not a readable image (corrupt, truncated, empty, unknown format)."""


class ImageTooLargeError(ImageDecodeError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str  # PIL's format name, e.g. "JPEG"
    mode: str  # the mode as stored, before conversion to RGB


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    _admit_in_pil(max_pixels)
    with warnings.catch_warnings():
        # PIL only warns between its limit and twice it; we enforce our own limit below instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"more than the limit of {max_pixels} pixels (Pillow: {exc})") from exc
        except UnidentifiedImageError as exc:
            # PIL's message names the BytesIO object's address, which would differ between runs
            raise ImageDecodeError("not a readable image: unknown format or corrupt header") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageDecodeError(f"not a readable image: {exc}") from exc
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels")
    return img


def _admit_in_pil(max_pixels: int | None) -> None:
    """Raise (never lower) PIL's own guard, which errors above twice MAX_IMAGE_PIXELS, so that it cannot
    refuse an image that the configured `max_pixels` admits; `_open` enforces `max_pixels` itself."""
    pil = Image.MAX_IMAGE_PIXELS
    if pil is not None and (max_pixels is None or 2 * pil < max_pixels):
        Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels // 2 + 1


FORMAT_NAMES = {"jpg": "jpeg", "jpe": "jpeg", "tif": "tiff"}  # one name per format, whatever the extension


def format_of(ext: str) -> str:
    """An image file's format by its extension: `JPG` and `jpeg` are one format."""
    ext = ext.lower().lstrip(".")
    return FORMAT_NAMES.get(ext, ext)


def probe_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode `data` (so truncation is caught) and report its size after orientation."""
    img = _open(data, max_pixels)
    fmt, mode = img.format or "", img.mode
    rgb = pil_to_rgb(img)
    return ImageInfo(width=rgb.shape[1], height=rgb.shape[0], format=fmt, mode=mode)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to an (H, W, 3) uint8 RGB array with EXIF orientation applied.

    Greyscale, palette, CMYK, 16-bit and float images are converted to 8-bit RGB; an alpha channel is
    dropped (not composited), so the stored colour values, and the traces in them, stay as they are.
    """
    return pil_to_rgb(_open(data, max_pixels))


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """An opened PIL image -> (H, W, 3) uint8 RGB, by the same rules as `decode_image`."""
    try:
        img.load()
        fmt = img.format  # before the transpose, whose copy has none
        img = ImageOps.exif_transpose(img)
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            # a PNG's integer samples are 16-bit whichever mode a Pillow release opens them as ("I" or "I;16")
            sixteen_bit = mode.startswith("I;16") or (mode == "I" and fmt == "PNG")
            a8 = _grey_to_8bit(np.asarray(img), sixteen_bit=sixteen_bit)
            return np.ascontiguousarray(np.repeat(a8[..., None], 3, axis=2))
        if mode == "P" or mode == "PA":
            img = img.convert("RGBA")
        if mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, IndexError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageDecodeError(f"decoded to an unusable array of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _grey_to_8bit(a: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """One channel of 16-bit, 32-bit integer or float samples -> uint8.

    16-bit samples keep their top byte. 32-bit integers ("I", whose depth the file does not say) by the range
    their values use: all within 0..255 are taken as 8-bit values, anything larger as 16-bit (top byte).
    Floats: all finite values within 0..1 are scaled by 255 (the usual convention of float TIFFs), anything
    else is taken as 0..255; both are rounded; NaN is 0, +inf 255; out-of-range values are clipped. The
    range rule looks at one image's own values, so a file always decodes the same way.
    """
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0  # infinities do not decide the range
        return np.clip(np.rint(np.nan_to_num(a * scale, nan=0.0, posinf=255.0, neginf=0.0)), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    if not sixteen_bit and a.size and a.max() <= 255:
        return np.clip(a, 0, 255).astype(np.uint8)
    return (np.clip(a, 0, 65535) >> 8).astype(np.uint8)


@dataclass(frozen=True)
class JpegFrame:
    width: int  # as stored, before any EXIF orientation
    height: int
    components: int  # 1 grey, 3 YCbCr (or RGB), 4 CMYK/YCCK
    has_exif: bool  # an APP1 Exif or XMP segment precedes the frame (PIL reads an orientation from either)
    marker: int = 0xC0  # its start-of-frame marker: C0 baseline, C1 extended, C2 progressive; others are lossless,
    # hierarchical or arithmetic-coded
    precision: int = 8  # bits per sample (12 and 16 exist)
    adobe_transform: int | None = None  # an APP14 Adobe segment's colour transform (0: stored as RGB or CMYK)


# start-of-frame markers: baseline, extended, progressive and lossless, Huffman or arithmetic (not DHT,
# JPG or DAC, which share the range)
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"  # an APP1 segment of XMP, where a tiff:Orientation may be
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """A JPEG's frame header read from its marker segments (no pixels, no PIL), or None when the bytes do
    not reach a well-formed frame header. A fast check before handing bytes to another decoder; the decode
    function stays the judge of what is readable."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n, exif, adobe = 2, len(data), False, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan, before any frame header
            return None
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if length < 2:
            return None
        if marker == 0xE1 and (data[i + 4 : i + 10] == b"Exif\x00\x00" or data[i + 4 : i + 4 + len(_XMP)] == _XMP):
            exif = True
        if marker == 0xEE and length >= 14 and data[i + 4 : i + 9] == b"Adobe" and i + 16 <= n:
            adobe = data[i + 15]
        if marker in _SOF_MARKERS:
            if length < 8 or i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            if not width or not height:  # a height given later by a DNL marker: leave it to PIL
                return None
            return JpegFrame(width, height, data[i + 9], exif, marker, data[i + 4], adobe)
        i += 2 + length
    return None
