"""Training augmentation that keeps the store join true: grid cells chosen, then photometric changes per patch,
drawn in the loader and applied there or on the training device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semspai.pipeline.config import AugConfig
from semspai.pipeline.photometric import add_noise, gaussian_blur, host_to, jpeg


def choose_cells(n_cells: int, max_patches: int, rng: np.random.Generator) -> np.ndarray:
    """A random subset of at most `max_patches` grid cells, in grid order: (k,) int64.

    Only whole cells of the image's grid are ever chosen (never a shifted or resized crop), so every patch
    keeps exactly the pixels its cached local CLIP vector was computed from.
    """
    if max_patches <= 0 or n_cells <= max_patches:
        return np.arange(n_cells)
    return np.sort(rng.choice(n_cells, size=max_patches, replace=False))


FLIP, BLUR, JPEG, NOISE = range(4)  # columns of AugDraws.fire, in the order the transforms apply


@dataclass
class AugDraws:
    """SPAI's training perturbations drawn for P patches: which fire and how strong, one row per patch.

    Drawn in the loader (a function of seed, epoch and key), so where they are applied, in the loader process or
    on the training device, does not change what is drawn.
    """

    fire: np.ndarray  # (P, 4) bool: flip, blur, JPEG, noise
    sigma: np.ndarray  # (P,) float64 blur sigma in pixels
    quality: np.ndarray  # (P,) int64 JPEG quality
    std: np.ndarray  # (P,) float64 noise std on [0, 1] pixels
    seed: np.ndarray  # (P,) int64 seed of the patch's noise pixels

    @classmethod
    def draw(cls, n: int, aug: AugConfig, rng: np.random.Generator) -> AugDraws:
        """Per patch, in patch order: the four coin flips, then sigma, quality, std and noise seed. Every draw is
        made whether or not its transform fires, so a patch's augmentation does not depend on which transforms
        fired for the patches before it."""
        fire, sigma, quality, std, seed = [], [], [], [], []
        probs = np.array([aug.FLIP_PROB, aug.BLUR_PROB, aug.JPEG_PROB, aug.NOISE_PROB])
        for _ in range(n):
            fire.append(rng.random(4) < probs)
            sigma.append(rng.uniform(*aug.BLUR_SIGMA))
            quality.append(int(rng.integers(aug.JPEG_QUALITY[0], aug.JPEG_QUALITY[1] + 1)))
            std.append(rng.uniform(*aug.NOISE_STD))
            seed.append(int(rng.integers(2**63)))
        return cls(
            fire=np.array(fire, dtype=bool).reshape(n, 4),
            sigma=np.array(sigma, dtype=np.float64),
            quality=np.array(quality, dtype=np.int64),
            std=np.array(std, dtype=np.float64),
            seed=np.array(seed, dtype=np.int64),
        )

    @classmethod
    def cat(cls, parts: list[AugDraws]) -> AugDraws:
        """The draws of consecutive samples' patches as one (a batch's, in its packed patch order)."""
        return cls(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("fire", "sigma", "quality", "std", "seed"))
        )

    def __len__(self) -> int:
        return len(self.fire)

    def apply(self, patches: torch.Tensor) -> torch.Tensor:
        """(P, S, S, 3) uint8 on any device -> the patches flipped, blurred, JPEG re-compressed and noised where
        drawn, in that order, on that device; uint8 (patches travel 4x lighter than float)."""
        if len(patches) != len(self):
            raise ValueError(f"{len(patches)} patches but augmentation drawn for {len(self)}")
        out = patches
        for column, transform in (
            (FLIP, lambda x, i: x.flip(2)),
            (BLUR, lambda x, i: gaussian_blur(x, self.sigma[i])),
            (JPEG, lambda x, i: jpeg(x, self.quality[i])),
            (NOISE, lambda x, i: add_noise(x, self.std[i], self.seed[i])),
        ):
            which = np.flatnonzero(self.fire[:, column])
            if not len(which):
                continue
            index = host_to(out.device, which)
            rows = transform(out.index_select(0, index), which)
            out = out.clone(memory_format=torch.contiguous_format) if out is patches else out
            _words(out).index_copy_(0, index, _words(rows))
        return out


def _words(patches: torch.Tensor) -> torch.Tensor:
    """(P, S, S, 3) uint8 viewed as (P, S * S * 3 / 4) int32 where the size allows: the CPU's index copy goes
    element by element, 7x faster over 4-byte words than over bytes."""
    flat = patches.view(len(patches), -1)  # a view, never a copy: the caller writes through it
    return flat.view(torch.int32) if flat.shape[1] % 4 == 0 else flat
