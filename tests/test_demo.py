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
