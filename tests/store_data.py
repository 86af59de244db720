"""Tiny shard tars for the feature-store and extract-clip tests, written with the project's ShardWriter."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from semspai.store.shards import ShardWriter

# (width, height): a 224 square (five equal crops), one under 224 (padded), a 2x2 grid, wide and tall images
SIZES = ((224, 224), (300, 200), (480, 460), (700, 250), (240, 520))
CORRUPT_KEY = "s1bad"


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth noise plus grain, so crops differ and JPEGs look photo-like."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_shards(out: Path, n_shards: int = 3, per_shard: int = 4, corrupt: bool = True) -> list[Path]:
    """`out/train-00000N.tar`: mixed sizes and formats, captions on every other image, one unreadable
    image in shard 1 (when `corrupt`)."""
    out.mkdir(parents=True, exist_ok=True)
    paths, seed = [], 0
    for s in range(n_shards):
        writer = ShardWriter(out / f"train-{s:06d}.tar")
        for i in range(per_shard):
            w, h = SIZES[seed % len(SIZES)]
            fmt, ext = ("JPEG", "jpg") if seed % 2 else ("PNG", "png")
            meta = {
                "label": seed % 2,
                "generator": "camera" if seed % 2 == 0 else f"gan_{seed % 3}",
                "caption": f"a photo number {seed}" if seed % 2 == 0 else "",
                "split": ("train", "val", "test")[seed % 3],
                "width": w,
                "height": h,
            }
            writer.write(f"s{s}n{i}", encode(photo(w, h, seed), fmt), ext, meta)
            seed += 1
        if corrupt and s == 1:
            writer.write(CORRUPT_KEY, b"\xff\xd8\xff\xe0 not really a jpeg", "jpg", {"label": 1, "generator": "x"})
        writer.close()
        paths.append(out / f"train-{s:06d}.tar")
    return paths
