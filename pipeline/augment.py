"""Training augmentation that keeps the store join true: grid cells chosen, then photometric changes per patch."""

from __future__ import annotations

import numpy as np
import torch

from semspai.pipeline.config import AugConfig
from semspai.pipeline.perturb import add_noise, gaussian_blur, jpeg_roundtrip


def choose_cells(n_cells: int, max_patches: int, rng: np.random.Generator) -> np.ndarray:
    """A random subset of at most `max_patches` grid cells, in grid order: (k,) int64.

    Only whole cells of the image's grid are ever chosen (never a shifted or resized crop), so every patch
    keeps exactly the pixels its cached local CLIP vector was computed from.
    """
    if max_patches <= 0 or n_cells <= max_patches:
        return np.arange(n_cells)
    return np.sort(rng.choice(n_cells, size=max_patches, replace=False))


def augment_patch(patch: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    """SPAI's training perturbations on one (S, S, 3) uint8 patch (writable, as `crop_patches` makes them): flip,
    blur, JPEG, noise; returns uint8.

    Every draw is made whether or not its transform applies, so the stream of draws (and hence a sample's
    augmentation) does not depend on which transforms happened to fire before it.
    """
    flip, blur, jpeg, noise = rng.random(4)
    sigma = rng.uniform(*aug.BLUR_SIGMA)
    quality = int(rng.integers(aug.JPEG_QUALITY[0], aug.JPEG_QUALITY[1] + 1))
    std = rng.uniform(*aug.NOISE_STD)
    noise_seed = int(rng.integers(2**63))  # the noise pixels come from their own generator, drawn or not
    if flip < aug.FLIP_PROB:  # a contiguous copy: torch's is 7x faster than numpy's strided one of 3-byte pixels
        patch = torch.flip(torch.from_numpy(patch), [1]).numpy()
    if blur < aug.BLUR_PROB:
        patch = gaussian_blur(patch, sigma)
    if jpeg < aug.JPEG_PROB:
        patch = jpeg_roundtrip(patch, quality)
    if noise < aug.NOISE_PROB:
        patch = add_noise(patch, std, np.random.default_rng(noise_seed))  # back to uint8: patches travel 4x lighter
    return np.ascontiguousarray(patch)


def augment_patches(patches: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    """(P, S, S, 3) uint8 -> (P, S, S, 3) uint8, each patch perturbed independently."""
    return np.stack([augment_patch(p, aug, rng) for p in patches])
