"""Tiny shard tars for the feature-store and extract-clip tests, written with the project's ShardWriter."""

from __future__ import annotations

from pathlib import Path

from semspai.store.shards import ShardWriter
from tests.conftest import encode, random_photo

# (width, height): a 224 square (five equal crops), one under 224 (padded), a 2x2 grid, wide and tall images
SIZES = ((224, 224), (300, 200), (480, 460), (700, 250), (240, 520))
CORRUPT_KEY = "s1bad"


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
            writer.write(
                f"s{s}n{i}",
                encode(random_photo(w, h, seed), fmt, **({"quality": 90} if ext == "jpg" else {})),
                ext,
                meta,
            )
            seed += 1
        if corrupt and s == 1:
            writer.write(CORRUPT_KEY, b"\xff\xd8\xff\xe0 not really a jpeg", "jpg", {"label": 1, "generator": "x"})
        writer.close()
        paths.append(out / f"train-{s:06d}.tar")
    return paths
