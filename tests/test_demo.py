"""The demo's synthetic set and its shipped run config."""

from __future__ import annotations

import numpy as np

from semspai.pipeline.config import load_config, shipped_config
from semspai.pipeline.demodata import CROP_SIDES, GENERATORS, PHOTOS, load_photos, make_demo_set


def test_fakes_match_their_reals_in_size_group_and_caption_but_not_pixels():
    images = make_demo_set(crops_per_photo=2, seed=0)
    assert len(images) == 2 * 2 * len(PHOTOS)
    reals, fakes = images[0::2], images[1::2]
    assert {r.label for r in reals} == {0} and {f.label for f in fakes} == {1}
    assert {f.generator for f in fakes} == set(GENERATORS)
    for real, fake in zip(reals, fakes, strict=True):
        assert real.rgb.shape == fake.rgb.shape and real.rgb.dtype == fake.rgb.dtype == np.uint8
        assert real.group == fake.group and real.caption == fake.caption
        assert np.abs(real.rgb.astype(int) - fake.rgb).mean() > 0.3  # the decoder left a trace (dark photos: small)


def test_reals_are_crops_never_upscaled_and_some_are_under_224():
    photos = load_photos()
    images = make_demo_set(crops_per_photo=6, seed=0)
    for img in images[0::2]:
        h, w = img.rgb.shape[:2]
        ph, pw = photos[img.generator].shape[:2]
        assert h in CROP_SIDES and w in CROP_SIDES and h <= ph and w <= pw
    assert min(min(img.rgb.shape[:2]) for img in images) < 224


def test_demo_set_is_deterministic():
    a, b = make_demo_set(1, seed=3), make_demo_set(1, seed=3)
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a, b, strict=True))


def test_shipped_demo_config_loads():
    cfg = load_config(shipped_config("demo"))
    assert cfg.MODEL.SEMANTIC.MODE == "global_local" and cfg.MODEL.SPECTRAL.ENCODER == "spectral-vit-micro"


def test_a_demo_folder_from_another_version_names_demo_force(tmp_path):
    """A stage of OUT that is stale (here: its shards made with another shard size, as another semspai
    version's would be) stops the demo with the command that redoes it, before any extraction."""
    from click.testing import CliRunner

    from semspai.stages import shard
    from semspai.stages.cli import cli
    from semspai.stages.demo import DemoConfig, write_demo_images

    out = tmp_path / "demo"
    manifest = write_demo_images(DemoConfig(out=str(out)))
    shard.run(shard.ShardConfig(sources=[], manifests=[str(manifest)], out=str(out / "shards"), shard_size=7))
    res = CliRunner().invoke(cli, ["demo", "--out", str(out)])
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert "is stale" in line and line.endswith(f"(for the demo: `semspai demo --out {out} --force` redoes it all)")
    assert not (out / "features.zarr").exists()
