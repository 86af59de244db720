"""Photometric transforms (blur, JPEG, noise) of uint8 image batches on the device holding them, per-image strength."""

from __future__ import annotations

import functools
import io
from statistics import NormalDist

import numpy as np
import torch
from PIL import Image

from semspai.store.images import decode_image

BLUR_TRUNCATE = 3.0  # the blur kernel reaches this many sigmas (the weights beyond sum to < 0.3%)


def host_to(device: torch.device, array: np.ndarray) -> torch.Tensor:
    """A small host array on `device`; to a GPU through page-locked memory, so the copy never makes the host wait
    for the device's queued work (as a copy from pageable memory can)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _edge_extended(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """`x` with `before` and `after` more samples along `dim` (negative: fewer), the edge sample repeated."""
    size = x.shape[dim]
    return x.index_select(dim, torch.arange(-before, size + after, device=x.device).clamp_(0, size - 1))


def gaussian_blur(x: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the same, image i blurred by a Gaussian of `sigmas[i]` pixels (edges extended).

    Separable: two passes of shifted copies weighted per image, elementwise only, so an image's result is the
    same in any batch (bit for bit) and on any device (up to float rounding). A sigma of 0 leaves it as it is.
    """
    sigmas = np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-6)  # (N,)
    reach = np.ceil(BLUR_TRUNCATE * sigmas)  # (N,) each image's own kernel radius: the batch's widest is padded
    radius = max(1, int(reach.max()))  # with zero weights, which leave the sums exactly as they would be alone
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.where(np.abs(taps) <= reach[:, None], np.exp(-(taps**2) / (2 * sigmas[:, None] ** 2)), 0.0)
    weights = host_to(x.device, (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32))  # (N, K)
    n = len(x)
    y = x.float()
    for dim in (2, 1):  # along rows, then along columns
        size = y.shape[dim]
        padded = _edge_extended(y, dim, radius, radius)
        out = padded.narrow(dim, 0, size) * weights[:, 0].view(n, 1, 1, 1)
        for k in range(1, 2 * radius + 1):
            out.addcmul_(padded.narrow(dim, k, size), weights[:, k].view(n, 1, 1, 1))
        y = out
    return y.round_().clamp_(0, 255).to(torch.uint8)


# The IJG quantisation tables (JPEG standard, Annex K), in natural row order: luminance, then chrominance
_QUANT_BASE = (
    (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29,
     51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92, 49, 64, 78, 87, 103, 121,
     120, 101, 72, 92, 95, 98, 112, 100, 103, 99),
    (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99,
     99, 99, 99, 99, *([99] * 32)),
)  # fmt: skip


def quant_tables(qualities: np.ndarray) -> np.ndarray:
    """(N,) JPEG qualities 1..100 -> (N, 2, 8, 8) luminance and chrominance tables, scaled as libjpeg's
    `jpeg_set_quality` scales them (baseline: capped at 255)."""
    q = np.clip(np.asarray(qualities, dtype=np.int64), 1, 100)
    scale = np.where(q < 50, 5000 // q, 200 - 2 * q)
    base = np.asarray(_QUANT_BASE, dtype=np.int64).reshape(1, 2, 8, 8)
    return np.clip((base * scale.reshape(-1, 1, 1, 1) + 50) // 100, 1, 255)


# libjpeg's accurate integer DCT ("islow", its default), with its constants: round(c * 2**13) of the factors
_CONST_BITS, _PASS1_BITS = 13, 2
_F0_298, _F0_390, _F0_541, _F0_765, _F0_899, _F1_175 = 2446, 3196, 4433, 6270, 7373, 9633
_F1_501, _F1_847, _F1_961, _F2_053, _F2_562, _F3_072 = 12299, 15137, 16069, 16819, 20995, 25172


def _fix16(c: float) -> int:
    """libjpeg's FIX(c) for its colour conversion: c in 16-bit fixed point."""
    return int(c * 65536 + 0.5)


_HALF, _CBCR_OFFSET = 1 << 15, 128 << 16


def _rotate_odd(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The odd-part butterfly that libjpeg's forward and inverse DCT share (scaled by 2**13)."""
    z1, z2, z3, z4 = a + d, b + c, a + c, b + d
    z5 = (z3 + z4) * _F1_175
    z1, z2, z3, z4 = z1 * -_F0_899, z2 * -_F2_562, z3 * -_F1_961 + z5, z4 * -_F0_390 + z5
    return a * _F0_298 + z1 + z3, b * _F2_053 + z2 + z4, c * _F3_072 + z2 + z3, d * _F1_501 + z1 + z4


def _fdct_butterfly(s: torch.Tensor) -> torch.Tensor:
    """libjpeg's forward DCT of 8 integers along the last dim, before it descales: integer-linear."""
    d0, d1, d2, d3, d4, d5, d6, d7 = s.unbind(-1)
    t0, t1, t2, t3 = d0 + d7, d1 + d6, d2 + d5, d3 + d4
    t10, t11, t12, t13 = t0 + t3, t1 + t2, t1 - t2, t0 - t3
    z1 = (t12 + t13) * _F0_541
    o7, o5, o3, o1 = _rotate_odd(d3 - d4, d2 - d5, d1 - d6, d0 - d7)
    return torch.stack([t10 + t11, o1, z1 + t13 * _F0_765, o3, t10 - t11, o5, z1 - t12 * _F1_847, o7], dim=-1)


def _idct_butterfly(c: torch.Tensor) -> torch.Tensor:
    """libjpeg's inverse DCT of 8 integers along the last dim, before it descales: integer-linear."""
    c0, c1, c2, c3, c4, c5, c6, c7 = c.unbind(-1)
    z1 = (c2 + c6) * _F0_541
    t2, t3 = z1 - c6 * _F1_847, z1 + c2 * _F0_765
    t0, t1 = (c0 + c4) << _CONST_BITS, (c0 - c4) << _CONST_BITS
    t10, t11, t12, t13 = t0 + t3, t1 + t2, t1 - t2, t0 - t3
    o0, o1, o2, o3 = _rotate_odd(c7, c5, c3, c1)
    return torch.stack([t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3], dim=-1)


# How libjpeg descales each of a pass's 8 outputs: by 2**bits, rounding half up (negative: scaled up instead)
_C, _P = _CONST_BITS, _PASS1_BITS
_PASSES = {
    "forward rows": (_fdct_butterfly, [-_P, _C - _P, _C - _P, _C - _P, -_P, _C - _P, _C - _P, _C - _P]),
    "forward columns": (_fdct_butterfly, [_P, _C + _P, _C + _P, _C + _P, _P, _C + _P, _C + _P, _C + _P]),
    "inverse columns": (_idct_butterfly, [_C - _P] * 8),
    "inverse rows": (_idct_butterfly, [_C + _P + 3] * 8),
}


@functools.cache
def _dct_pass(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of libjpeg's integer DCT as (weights (8, 8), bias (8,), scale (8,)), float64 on `device`:
    `floor((x @ weights + bias) * scale)` is the pass, exactly. Inside a pass libjpeg only adds and multiplies
    integers, so each output is an integer combination of the 8 inputs, which the butterfly gives when run on
    the identity; the products and sums stay below 2**53, so float64 matrix products are exact in any order."""
    butterfly, bits = _PASSES[name]
    weights = butterfly(torch.eye(8, dtype=torch.int64)).double().numpy()  # row j: the outputs of input j
    bits = np.asarray(bits, dtype=np.float64)
    bias, scale = np.where(bits > 0, 2.0 ** (bits - 1), 0.0), 2.0**-bits
    return host_to(device, weights), host_to(device, bias), host_to(device, scale)


def _dct(x: torch.Tensor, rows: str, columns: str) -> torch.Tensor:
    """Two passes of libjpeg's integer DCT on (..., 8, 8) float64 blocks of integers: along rows, then columns."""
    for name, transposed in ((rows, False), (columns, True)):
        weights, bias, scale = _dct_pass(name, x.device)
        x = x.transpose(-1, -2) if transposed else x
        x = ((x @ weights + bias) * scale).floor_()
        x = x.transpose(-1, -2) if transposed else x
    return x


def _code_plane(plane: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """(N, H, W) int64 samples 0..255 (sides multiples of 8), (N, 64) tables -> the plane after libjpeg's
    forward DCT, quantisation (half away from zero), dequantisation and inverse DCT, bit for bit."""
    n, h, w = plane.shape
    blocks = (plane - 128).double().view(n, h // 8, 8, w // 8, 8).transpose(2, 3)  # (N, H/8, W/8, 8, 8)
    coef = _dct(blocks, "forward rows", "forward columns")  # scaled by 8
    q = tables.view(n, 1, 1, 8, 8).double()
    levels = torch.where(coef < 0, -((4 * q - coef) / (8 * q)).floor_(), ((coef + 4 * q) / (8 * q)).floor_())
    # libjpeg's inverse runs down the columns first
    out = _dct((levels * q).transpose(-1, -2), "inverse columns", "inverse rows").transpose(-1, -2)
    return (out.long() + 128).clamp_(0, 255).transpose(2, 3).reshape(n, h, w)


def _upsample_h2v2(c: torch.Tensor) -> torch.Tensor:
    """(N, h, w) int64 -> (N, 2h, 2w): libjpeg's "fancy" 4:2:0 chroma upsampling (triangular weights 9:3:3:1,
    edge samples repeated), with its integer rounding."""
    above, below = _edge_extended(c, 1, 1, -1), _edge_extended(c, 1, -1, 1)  # c moved one row down, one up
    rows = torch.stack([3 * c + above, 3 * c + below], dim=2).flatten(1, 2)  # (N, 2h, w), 4x the sample
    even = (3 * rows + _edge_extended(rows, 2, 1, -1) + 8) >> 4
    odd = (3 * rows + _edge_extended(rows, 2, -1, 1) + 7) >> 4
    return torch.stack([even, odd], dim=3).flatten(2)


def jpeg(x: torch.Tensor, qualities: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the same after a JPEG round trip at `qualities[i]`: on the CPU through the codec
    itself (`jpeg_roundtrip`, faster there); on an accelerator with libjpeg's own arithmetic (`simulated_jpeg`,
    the same pixels), where sending the pixels to the host codec and back would make the host wait for the
    device."""
    if x.device.type != "cpu":
        return simulated_jpeg(x, qualities)
    out = torch.empty_like(x)
    for img, q, dst in zip(x, qualities, out.numpy(), strict=True):
        dst[...] = jpeg_roundtrip(img.numpy(), q)
    return out


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 re-encoded as JPEG at `quality` and read back through the one decode function, as a real
    JPEG would be."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=int(quality))
    return decode_image(buf.getvalue())


def simulated_jpeg(x: torch.Tensor, qualities: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the same after a JPEG round trip at `qualities[i]`, on the pixels' device, bit for bit
    what libjpeg(-turbo) gives with the defaults PIL and torchvision use: its fixed-point RGB -> YCbCr, 4:2:0
    chroma as 2 x 2 means with its alternating rounding bias, sides extended as its encoder extends them, its
    integer DCT, quantisation by the IJG tables at that quality, the inverse DCT, "fancy" upsampling from the
    real chroma samples and its fixed-point YCbCr -> RGB. Only the entropy coding, which loses nothing, is left
    out. Integer arithmetic throughout: autocast cannot touch it, and every device gives the same result."""
    n, h, w, _ = x.shape
    dev = x.device
    # the encoder repeats the last pixel column out to whole 16-px blocks, and the last row to an even count
    f = _edge_extended(_edge_extended(x.long(), 2, 0, -w % 16), 1, 0, h % 2)
    r, g, b = f.unbind(-1)  # each (N, H', W')
    y = (_fix16(0.299) * r + _fix16(0.587) * g + _fix16(0.114) * b + _HALF) >> 16
    cb = (-_fix16(0.16874) * r - _fix16(0.33126) * g + _fix16(0.5) * b + _CBCR_OFFSET + _HALF - 1) >> 16
    cr = (_fix16(0.5) * r - _fix16(0.41869) * g - _fix16(0.08131) * b + _CBCR_OFFSET + _HALF - 1) >> 16
    bias = torch.arange(f.shape[2] // 2, device=dev) % 2 + 1  # libjpeg alternates 1, 2 to round the 2 x 2 mean
    tables = host_to(dev, quant_tables(qualities).reshape(n, 2, 64))

    def coded_chroma(c: torch.Tensor) -> torch.Tensor:
        c = (c[:, 0::2, 0::2] + c[:, 0::2, 1::2] + c[:, 1::2, 0::2] + c[:, 1::2, 1::2] + bias) >> 2
        c = _code_plane(_edge_extended(c, 1, 0, -c.shape[1] % 8), tables[:, 1])  # last chroma row repeated
        return _upsample_h2v2(c[:, : (h + 1) // 2, : (w + 1) // 2])[:, :h, :w] - 128  # from real samples only

    y = _code_plane(_edge_extended(y, 1, 0, -y.shape[1] % 16), tables[:, 0])[:, :h, :w]
    cb, cr = coded_chroma(cb), coded_chroma(cr)
    rgb = torch.stack(
        [
            y + ((_fix16(1.402) * cr + _HALF) >> 16),
            y + ((-_fix16(0.34414) * cb - _fix16(0.71414) * cr + _HALF) >> 16),
            y + ((_fix16(1.772) * cb + _HALF) >> 16),
        ],
        dim=-1,
    )
    return rgb.clamp_(0, 255).to(torch.uint8)


NOISE_QUANTILES = 65536  # noise is drawn by inverse CDF from this many equally likely levels


@functools.cache
def _normal_quantiles(device: torch.device) -> torch.Tensor:
    """(NOISE_QUANTILES,) float32 on `device`: the standard normal's quantiles at the levels' midpoints (+-4.32 at
    the ends)."""
    normal = NormalDist()
    table = [normal.inv_cdf((k + 0.5) / NOISE_QUANTILES) for k in range(NOISE_QUANTILES)]
    return host_to(device, np.array(table, dtype=np.float32))


def add_noise(x: torch.Tensor, stds: np.ndarray, seeds: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the same plus Gaussian noise of `stds[i]` (on [0, 1] pixels), quantised back to 8 bits
    like any stored image; image i's noise comes from a generator seeded `seeds[i]` (numpy's on the CPU, torch's
    on an accelerator: the same seed gives other noise there).

    By inverse CDF: a 16-bit uniform draw per pixel picks one of the normal's 65,536 quantiles, already scaled and
    rounded to whole grey levels (rounding an integer plus x is the integer plus rounded x, but for exact .5 ties),
    so no float work per pixel. Tails beyond 4.32 standard deviations are cut (1 draw in 65,536 sits at the last
    level). Beyond +-255 a level saturates every pixel anyway: the clip keeps any std (inf too) exact.
    """
    dev = x.device
    scale = host_to(dev, np.asarray(stds, dtype=np.float32) * 255.0).view(-1, 1)
    levels = (_normal_quantiles(dev) * scale).round_().clamp_(-255, 255).to(torch.int16)  # (N, 65536)
    noisy = torch.empty(x.shape, dtype=torch.int16, device=dev)
    for i, seed in enumerate(np.asarray(seeds, dtype=np.int64).tolist()):
        if dev.type == "cpu":  # numpy draws 16-bit values and picks by them 2x faster than torch on the CPU
            draws = np.random.default_rng(seed).integers(0, NOISE_QUANTILES, x.shape[1:], dtype=np.uint16)
            np.take(levels[i].numpy(), draws, out=noisy[i].numpy())
            continue
        generator = torch.Generator(dev).manual_seed(seed)
        torch.take(
            levels[i], torch.randint(NOISE_QUANTILES, x.shape[1:], generator=generator, device=dev), out=noisy[i]
        )
    noisy += x
    return noisy.clamp_(0, 255).to(torch.uint8)
