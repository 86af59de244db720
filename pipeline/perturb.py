"""Robustness perturbations for eval (`--perturb jpeg:50,75 --perturb blur:1.0`): deterministic, on decoded pixels."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from semspai.store.images import decode_image

KINDS = {  # kind -> (what the value means, valid range check)
    "jpeg": ("JPEG quality 1..100", lambda v: v == int(v) and 1 <= v <= 100),
    "resize": ("scale factor > 0 (bicubic)", lambda v: v > 0),
    "blur": ("Gaussian sigma in pixels > 0", lambda v: v > 0),
    "noise": ("Gaussian noise std on [0, 1] pixels > 0", lambda v: v > 0),
}


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
        img = Image.fromarray(rgb)
        if self.kind == "jpeg":
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=int(self.value))
            return decode_image(buf.getvalue())  # the one decode function, as a real JPEG would be read
        if self.kind == "resize":
            w, h = img.size
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            return np.asarray(img.resize(size, Image.BICUBIC))
        if self.kind == "blur":
            return np.asarray(img.filter(ImageFilter.GaussianBlur(radius=self.value)))  # PIL's radius is sigma
        seed = int.from_bytes(hashlib.sha256(f"{self.name}|{key}".encode()).digest()[:8], "little")
        noise = np.random.default_rng(seed).normal(0.0, self.value * 255.0, rgb.shape)
        return np.clip(np.rint(rgb + noise), 0, 255).astype(np.uint8)


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
