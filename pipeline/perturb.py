"""Robustness perturbations for eval (`--perturb jpeg:50,75 --perturb blur:1.0`): deterministic, on decoded pixels."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from semspai.pipeline.photometric import add_noise, gaussian_blur, jpeg_roundtrip

MAX_UPSCALE = 4.0
KINDS = {  # kind -> (what the value means, valid range check)
    "jpeg": ("JPEG quality 1..100", lambda v: v == int(v) and 1 <= v <= 100),
    # at most 4x: a larger upscale of a large image runs out of memory (resize:100 of a 500-px image is 2.5 GP)
    "resize": ("scale factor in (0, 4] (bicubic)", lambda v: 0 < v <= MAX_UPSCALE),
    "blur": ("Gaussian sigma in pixels > 0", lambda v: v > 0),
    "noise": ("Gaussian noise std on [0, 1] pixels > 0", lambda v: v > 0),
}


def _one(transform: Callable[..., torch.Tensor], rgb: np.ndarray, *params) -> np.ndarray:
    """A batch transform of `photometric` on one (H, W, 3) image (writable, as torch wants it)."""
    return transform(torch.from_numpy(np.require(rgb, requirements="W"))[None], *params)[0].numpy()


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
            return jpeg_roundtrip(rgb, int(self.value))  # the codec itself: eval measures robustness to real JPEG
        if self.kind == "resize":
            img = Image.fromarray(rgb)
            w, h = img.size
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            return np.asarray(img.resize(size, Image.BICUBIC))
        if self.kind == "blur":
            return _one(gaussian_blur, rgb, [self.value])
        seed = int.from_bytes(hashlib.sha256(f"{self.name}|{key}".encode()).digest()[:8], "little") >> 1  # < 2**63
        return _one(add_noise, rgb, [self.value], [seed])


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
            if not math.isfinite(value) or not ok(value):
                raise PerturbError(f"--perturb {text!r}: {raw!r} is out of range ({kind}: {what})")
            p = Perturbation(kind, value)
            if p not in out:
                out.append(p)
    return out
