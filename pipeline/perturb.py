"""Robustness perturbations for eval (`--perturb jpeg:50,75 --perturb blur:1.0`): deterministic, on decoded pixels."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageFilter

from semspai.store.images import decode_image

KINDS = {  # kind -> (what the value means, valid range check)
    "jpeg": ("JPEG quality 1..100", lambda v: v == int(v) and 1 <= v <= 100),
    "resize": ("scale factor > 0 (bicubic)", lambda v: v > 0),
    "blur": ("Gaussian sigma in pixels > 0", lambda v: v > 0),
    "noise": ("Gaussian noise std on [0, 1] pixels > 0", lambda v: v > 0),
}


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Re-encode as JPEG at `quality` and read back through the one decode function, as a real JPEG would be."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, "JPEG", quality=int(quality))
    return decode_image(buf.getvalue())


def gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb)).filter(ImageFilter.GaussianBlur(sigma))
    )  # radius = sigma


NOISE_QUANTILES = 65536  # noise is drawn by inverse CDF from this many equally likely levels


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """(NOISE_QUANTILES,) float64, read-only: the standard normal's quantiles at the levels' midpoints (+-4.32 at
    the ends)."""
    normal = NormalDist()
    table = np.array([normal.inv_cdf((k + 0.5) / NOISE_QUANTILES) for k in range(NOISE_QUANTILES)])
    table.flags.writeable = False
    return table


def add_noise(rgb: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of `std` (on [0, 1] pixels), quantised back to 8 bits like any stored image.

    By inverse CDF: a 16-bit uniform draw per pixel picks one of the normal's 65,536 quantiles, already scaled and
    rounded to whole grey levels (the sum is rounded anyway, and rounding an integer plus x is the integer plus
    rounded x, but for exact .5 ties), so no float work per pixel: 3-4x faster than float32 normal draws, in the
    training loader's hottest step. Tails beyond 4.32 standard deviations are cut (1 draw in 65,536 sits at the
    last level)."""
    # beyond +-255 a level saturates every pixel anyway: the clip keeps any std exact and inside int16
    levels = np.clip(np.rint(_normal_quantiles() * (std * 255.0)), -255, 255).astype(np.int16)
    noisy = np.take(levels, rng.integers(0, NOISE_QUANTILES, rgb.shape, dtype=np.uint16))
    noisy += rgb
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


class PerturbError(ValueError):
    """A `--perturb` text cannot be parsed; the message names it and the accepted forms."""


@dataclass(frozen=True)
class Perturbation:
    kind: str  # one of KINDS
    value: float

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def apply(self, rgb: np.ndarray, key: str = "") -> np.ndarray:
        """(H, W, 3) uint8 -> perturbed (H', W', 3) uint8; noise is seeded by `key`, so every checkpoint of an
        ablation sees the same noisy pixels."""
        if self.kind == "jpeg":
            return jpeg_roundtrip(rgb, int(self.value))
        if self.kind == "resize":
            img = Image.fromarray(rgb)
            w, h = img.size
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            return np.asarray(img.resize(size, Image.BICUBIC))
        if self.kind == "blur":
            return gaussian_blur(rgb, self.value)
        seed = int.from_bytes(hashlib.sha256(f"{self.name}|{key}".encode()).digest()[:8], "little")
        return add_noise(rgb, self.value, np.random.default_rng(seed))


def parse_perturbations(texts: list[str] | tuple[str, ...]) -> list[Perturbation]:
    """`["jpeg:50,75", "blur:1.0"]` -> one Perturbation per value, in the order given, duplicates dropped."""
    out: list[Perturbation] = []
    for text in texts:
        kind, sep, values = text.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS or not sep or not values.strip():
            forms = ", ".join(f"{k}:V[,V...] ({what})" for k, (what, _) in KINDS.items())
            raise PerturbError(f"--perturb {text!r}: expected one of {forms}")
        what, ok = KINDS[kind]
        for raw in values.split(","):
            try:
                value = float(raw)
            except ValueError:
                raise PerturbError(f"--perturb {text!r}: {raw!r} is not a number ({kind}: {what})") from None
            if not ok(value):
                raise PerturbError(f"--perturb {text!r}: {raw!r} is out of range ({kind}: {what})")
            p = Perturbation(kind, value)
            if p not in out:
                out.append(p)
    return out
