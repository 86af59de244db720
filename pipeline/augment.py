"""Training augmentation that keeps the store join true: grid cells chosen, then photometric changes per patch."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from semspai.pipeline.config import AugConfig
from semspai.store.images import decode_image


def choose_cells(n_cells: int, max_patches: int, rng: np.random.Generator) -> np.ndarray:
    """A random subset of at most `max_patches` grid cells, in grid order: (k,) int64.

    Only whole cells of the image's grid are ever chosen (never a shifted or resized crop), so every patch
    keeps exactly the pixels its cached local CLIP vector was computed from.
    """
    if max_patches <= 0 or n_cells <= max_patches:
        return np.arange(n_cells)
    return np.sort(rng.choice(n_cells, size=max_patches, replace=False))


def _jpeg(patch: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue())  # the one decode function, as for every other pixel in the project


def augment_patch(patch: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    """SPAI's training perturbations on one (S, S, 3) uint8 patch: flip, blur, JPEG, noise; returns uint8.

    Every draw is made whether or not its transform applies, so the stream of draws (and hence a sample's
    augmentation) does not depend on which transforms happened to fire before it.
    """
    flip, blur, jpeg, noise = rng.random(4)
    sigma = rng.uniform(*aug.BLUR_SIGMA)
    quality = int(rng.integers(aug.JPEG_QUALITY[0], aug.JPEG_QUALITY[1] + 1))
    std = rng.uniform(*aug.NOISE_STD)
    if flip < aug.FLIP_PROB:
        patch = patch[:, ::-1]
    if blur < aug.BLUR_PROB:
        # PIL's GaussianBlur radius is the standard deviation in pixels
        patch = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).filter(ImageFilter.GaussianBlur(sigma)))
    if jpeg < aug.JPEG_PROB:
        patch = _jpeg(np.ascontiguousarray(patch), quality)
    if noise < aug.NOISE_PROB:
        # quantised back to 8 bits like any stored image, so patches travel as uint8 (4x less to move)
        noisy = patch.astype(np.float32) + rng.normal(0.0, std * 255.0, patch.shape).astype(np.float32)
        patch = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(patch)


def augment_patches(patches: np.ndarray, aug: AugConfig, rng: np.random.Generator) -> np.ndarray:
    """(P, S, S, 3) uint8 -> (P, S, S, 3) uint8, each patch perturbed independently."""
    return np.stack([augment_patch(p, aug, rng) for p in patches])
