"""Shared fixtures: tiny labelled image trees and shards made on the fly (no data files in the repo)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from semspai.pipeline.demodata import synthetic_photo


def random_photo(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth random content (upsampled noise plus grain), so encoded sizes look photo-like."""
    return synthetic_photo(width, height, seed)


def encode(rgb: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


XMP_ROTATED = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
               b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')  # fmt: skip


def with_adobe(data: bytes, transform: int) -> bytes:
    """`data` with an APP14 Adobe segment after its SOI: transform 0 says the components are stored as RGB."""
    return data[:2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform]) + data[2:]


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    """Write a random photo; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".bmp": "BMP"}
    path.write_bytes(encode(random_photo(width, height, seed), fmt[path.suffix.lower()]))
    return path


# (generator, label folder, count): two generators, reals from one camera-like source
TREE = (("camera", "real", 8), ("gan_a", "fake", 4), ("gan_b", "fake", 4))
SIZES = ((256, 256), (300, 240), (200, 180), (480, 460))


def make_tree(root: Path) -> Path:
    """`root/<real|fake>/<generator>/<n>.png|jpg` with mixed sizes, including one under 224 px."""
    seed = 0
    for gen, label, count in TREE:
        for i in range(count):
            w, h = SIZES[seed % len(SIZES)]
            write_image(root / label / gen / f"{i:03d}.{'png' if seed % 2 else 'jpg'}", w, h, seed)
            seed += 1
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images (8 real, 8 fake, two generators) sharded 4 per tar with an explicit split on every image."""
    from semspai.stages.shard import ShardConfig, run

    root = make_tree(tmp_path_factory.mktemp("tree") / "data")
    # an explicit, balanced split so every split holds reals and fakes whatever the hashes say
    rows = ["path,label,generator,split,caption"]
    for i, path in enumerate(sorted(root.rglob("*.*"))):
        label, gen = path.parts[-3], path.parts[-2]
        split = ("train", "train", "val", "test")[i % 4]
        rows.append(f"{path.relative_to(root)},{label},{gen},{split},a photo number {i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("shards")
    run(ShardConfig(sources=[], manifests=[str(root / "manifest.csv")], out=str(out), shard_size=4))
    return out


@pytest.fixture(scope="session")
def train_store(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-random feature store over `tiny_shards` (captions included), made in-process without Dask."""
    from semspai.stages.extract import ExtractConfig, run

    store = tmp_path_factory.mktemp("store") / "features.zarr"
    run(ExtractConfig(shards=str(tiny_shards), store=str(store), clip="tiny-random", workers=0))
    return store


def run_in_own_session(args: list[str], env: dict[str, str], timeout: float = 600, **popen) -> tuple[int, Any, Any]:
    """Run `args` in a session of its own: (return code, stdout, stderr). Whatever it started (a Dask cluster's
    processes) is killed with it afterwards, and nothing else."""
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.PIPE, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err
