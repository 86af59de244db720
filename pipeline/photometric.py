"""Photometric transforms (blur, JPEG, noise) of uint8 image batches on the device holding them, per-image strength."""

from __future__ import annotations

import functools
import io
import math
from contextlib import nullcontext
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


@functools.cache
def _dct_basis(device: torch.device) -> torch.Tensor:
    """(64, 64) orthonormal 2-D DCT-II of a row-major 8 x 8 block: JPEG's forward DCT is `blocks @ basis.T`, its
    inverse `coefs @ basis` (one matrix product for all blocks, not two small ones per block)."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return host_to(device, torch.kron(d, d).float().numpy())


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return x.add_(0.5).floor_()


def _code_plane(plane: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """(N, H, W) float samples 0..255, (N, 64) tables -> the plane after DCT, quantisation (libjpeg's rounding:
    half away from zero), dequantisation and inverse DCT, rounded to 0..255."""
    n, h, w = plane.shape
    basis = _dct_basis(plane.device)
    blocks = (plane - 128).view(n, h // 8, 8, w // 8, 8).transpose(2, 3).reshape(n, -1, 64)  # (N, blocks, 64)
    tables = tables.view(n, 1, 64)
    coef = blocks @ basis.T
    coef = torch.sign(coef) * _round_half_up(coef.abs() / tables) * tables
    out = _round_half_up(coef @ basis + 128).clamp_(0, 255)
    return out.view(n, h // 8, w // 8, 8, 8).transpose(2, 3).reshape(n, h, w)


def _upsample_h2v2(c: torch.Tensor) -> torch.Tensor:
    """(N, h, w) -> (N, 2h, 2w): libjpeg's "fancy" 4:2:0 chroma upsampling (triangular weights 9:3:3:1, edges
    repeated), with its integer rounding."""
    above, below = _edge_extended(c, 1, 1, -1), _edge_extended(c, 1, -1, 1)  # c moved one row down, one up
    rows = torch.stack([3 * c + above, 3 * c + below], dim=2).flatten(1, 2)  # (N, 2h, w), 4x the sample
    even = (3 * rows + _edge_extended(rows, 2, 1, -1)).add_(8).div_(16).floor_()
    odd = (3 * rows + _edge_extended(rows, 2, -1, 1)).add_(7).div_(16).floor_()
    return torch.stack([even, odd], dim=3).flatten(2)


def jpeg(x: torch.Tensor, qualities: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> the same after a JPEG round trip at `qualities[i]`: on the CPU through the codec
    itself (`jpeg_roundtrip`); on an accelerator simulated there (`simulated_jpeg`), where sending the pixels to
    the host codec and back would make the host wait for the device."""
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
    """(N, H, W, 3) uint8 -> the same after a JPEG round trip at `qualities[i]`, simulated on the pixels' device.

    The codec's lossy steps as libjpeg (what PIL and torchvision call) takes them with its defaults: RGB -> YCbCr,
    4:2:0 chroma averaged over 2 x 2, 8 x 8 DCT, quantisation by the IJG tables at that quality, the inverse,
    fancy chroma upsampling, YCbCr -> RGB. The entropy coding, which loses nothing, is skipped. Sides are extended
    to whole 16-px blocks by repeating the last pixel, as libjpeg's encoder does (its decoder upsamples the last
    chroma row of an even side that is not a multiple of 16 from the real samples only: such edges differ a
    little more; training patches are 224 px). Otherwise the one difference: the DCT is computed in floating
    point where libjpeg uses an integer approximation, so a coefficient within about 1/16 of a quantisation
    step from a rounding boundary may round the other way (the test states the agreement with a real round
    trip). Always float32, autocast or not: bf16 matrix products would move pixels by levels.
    """
    dev = x.device
    with torch.autocast(dev.type, enabled=False) if torch.amp.is_autocast_available(dev.type) else nullcontext():
        return _simulated_jpeg(x, qualities)


def _simulated_jpeg(x: torch.Tensor, qualities: np.ndarray) -> torch.Tensor:
    n, h, w, _ = x.shape
    dev = x.device
    f = _edge_extended(_edge_extended(x.float(), 1, 0, -h % 16), 2, 0, -w % 16)
    r, g, b = f.unbind(-1)  # each (N, H', W')
    y = _round_half_up(0.299 * r + 0.587 * g + 0.114 * b)
    cb = _round_half_up(-0.168735892 * r - 0.331264108 * g + 0.5 * b + (128 - 2**-16))
    cr = _round_half_up(0.5 * r - 0.418687589 * g - 0.081312411 * b + (128 - 2**-16))
    hw = y.shape[2] // 2
    bias = (torch.arange(hw, device=dev) % 2 + 1).float()  # libjpeg alternates 1, 2 to round the 2 x 2 mean

    def down(c: torch.Tensor) -> torch.Tensor:
        return (c[:, 0::2, 0::2] + c[:, 0::2, 1::2] + c[:, 1::2, 0::2] + c[:, 1::2, 1::2] + bias).div_(4).floor_()

    tables = host_to(dev, quant_tables(qualities).astype(np.float32).reshape(n, 2, 64))
    y = _code_plane(y, tables[:, 0])
    cb = _upsample_h2v2(_code_plane(down(cb), tables[:, 1])) - 128
    cr = _upsample_h2v2(_code_plane(down(cr), tables[:, 1])) - 128
    rgb = torch.stack(
        [
            y + _round_half_up(1.402 * cr),
            y + _round_half_up(-0.344136286 * cb - 0.714136286 * cr),
            y + _round_half_up(1.772 * cb),
        ],
        dim=-1,
    )
    return rgb[:, :h, :w].clamp_(0, 255).to(torch.uint8).contiguous()


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
