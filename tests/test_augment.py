"""Photometric transforms and where augmentation runs: the JPEG simulation against the codec, the blur against a
direct Gaussian, per-image independence, and the device placement giving the loader placement's pixels."""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from semspai.pipeline.augment import AugDraws
from semspai.pipeline.config import AugConfig
from semspai.pipeline.data import View, collate
from semspai.pipeline.demodata import load_photos, synthetic_photo
from semspai.pipeline.photometric import (
    BLUR_TRUNCATE,
    add_noise,
    gaussian_blur,
    jpeg,
    jpeg_roundtrip,
    quant_tables,
    simulated_jpeg,
)
from tests.test_data import HEAVY_AUG, _stream


@functools.cache
def _test_images() -> list[np.ndarray]:
    """Real photos (scikit-image's, no download), synthetic ones, noise, flat extremes, and sides that are not
    whole 16-px blocks (odd, and even but not a multiple of 16: the encoder and decoder extend those
    differently)."""
    photos = [np.ascontiguousarray(p[:224, :224]) for p in load_photos().values()]
    crops = [
        np.ascontiguousarray(photos[i % 3][:h, :w]) for i, (h, w) in enumerate([(101, 77), (100, 70), (8, 30), (1, 1)])
    ]
    noise = np.random.default_rng(0).integers(0, 256, (30, 46, 3), dtype=np.uint8)
    flat = [np.zeros((16, 16, 3), np.uint8), np.full((16, 24, 3), 255, np.uint8)]
    return [*photos[:3], *(synthetic_photo(224, 224, seed) for seed in range(2)), *crops, noise, *flat]


@pytest.mark.parametrize("quality", [1, 10, 30, 50, 75, 90, 95, 100])
def test_simulated_jpeg_is_the_codec_bit_for_bit(quality):
    """libjpeg's arithmetic in torch gives what the codec gives (checked here for every quality 1..100 too)."""
    for rgb in _test_images():
        assert np.array_equal(simulated_jpeg(torch.from_numpy(rgb)[None], [quality])[0].numpy(),
                              jpeg_roundtrip(rgb, quality)), rgb.shape  # fmt: skip


def test_quality_tables_are_libjpegs():
    rgb = synthetic_photo(64, 64, 0)
    for quality in (1, 10, 49, 50, 51, 90, 100):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
        tables = Image.open(buf).quantization  # {0: luminance, 1: chrominance}, natural order
        ours = quant_tables(np.array([quality]))[0].reshape(2, 64)
        assert ours[0].tolist() == list(tables[0]) and ours[1].tolist() == list(tables[1]), quality


def test_jpeg_on_the_cpu_is_the_codec_itself_and_per_image_elsewhere():
    images = _test_images()[:4]
    x = torch.from_numpy(np.stack(images))
    qualities = np.array([40, 60, 80, 95])
    out = jpeg(x, qualities)
    for i, rgb in enumerate(images):
        assert np.array_equal(out[i].numpy(), jpeg_roundtrip(rgb, qualities[i]))
    # the simulation of a batch is that of each image alone
    together = simulated_jpeg(x, qualities)
    alone = torch.cat([simulated_jpeg(x[i : i + 1], qualities[i : i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)


def test_simulated_jpeg_is_untouched_by_autocast():
    x = torch.from_numpy(np.stack([synthetic_photo(64, 48, seed) for seed in range(2)]))
    plain = simulated_jpeg(x, [60, 85])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's steps run under it: integer work only
        assert torch.equal(simulated_jpeg(x, [60, 85]), plain)


def _direct_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """The 2-D Gaussian (truncated and normalised as the tested one) applied at every pixel in float64."""
    r = math.ceil(BLUR_TRUNCATE * sigma)
    t = np.arange(-r, r + 1)
    k = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma**2))
    k /= k.sum()
    padded = np.pad(rgb.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="edge")
    h, w = rgb.shape[:2]
    out = sum(k[i, j] * padded[i : i + h, j : j + w] for i in range(2 * r + 1) for j in range(2 * r + 1))
    return np.clip(np.rint(out), 0, 255)


def test_blur_is_a_gaussian_of_each_images_own_sigma():
    images = np.stack([synthetic_photo(48, 40, seed) for seed in range(3)])
    sigmas = np.array([0.4, 1.0, 2.0])
    out = gaussian_blur(torch.from_numpy(images), sigmas).numpy()
    for img, sigma, got in zip(images, sigmas, out, strict=True):
        assert np.abs(got.astype(int) - _direct_blur(img, sigma)).max() <= 1  # float32 vs float64 rounding
        assert np.abs(got.astype(int) - img).mean() > 0.5  # it did blur
    alone = [gaussian_blur(torch.from_numpy(images[i : i + 1]), sigmas[i : i + 1]).numpy()[0] for i in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(alone, out, strict=True))  # a wider neighbour changes nothing
    assert np.array_equal(gaussian_blur(torch.from_numpy(images[:1]), [0.0]).numpy(), images[:1])
    flat = np.full((1, 20, 20, 3), 77, np.uint8)
    assert np.array_equal(gaussian_blur(torch.from_numpy(flat), [1.5]).numpy(), flat)


def test_drawn_augmentation_applies_each_transform_where_it_fires():
    patches = torch.from_numpy(np.stack([synthetic_photo(224, 224, s) for s in range(6)]))
    draws = AugDraws.draw(6, HEAVY_AUG, np.random.default_rng(0))
    draws.fire[:] = False
    for i, column in enumerate(range(4)):
        draws.fire[i + 1, column] = True  # patch 0 untouched; patches 1..4 one transform each; 5 all four
    draws.fire[5] = True
    out = draws.apply(patches)
    assert torch.equal(out[0], patches[0])
    assert torch.equal(out[1], patches[1].flip(1))
    assert torch.equal(out[2:3], gaussian_blur(patches[2:3], draws.sigma[2:3]))
    assert torch.equal(out[3:4], jpeg(patches[3:4], draws.quality[3:4]))
    assert torch.equal(out[4:5], add_noise(patches[4:5], draws.std[4:5], draws.seed[4:5]))
    step = patches[5:6].flip(2)
    step = jpeg(gaussian_blur(step, draws.sigma[5:6]), draws.quality[5:6])
    assert torch.equal(out[5:6], add_noise(step, draws.std[5:6], draws.seed[5:6]))  # in that order
    assert out.dtype == torch.uint8
    strided = torch.cat([patches, patches], dim=2)[:, :, :224]  # a view that is not contiguous
    assert not strided.is_contiguous() and torch.equal(draws.apply(strided), out)
    with pytest.raises(ValueError, match="5 patches but augmentation drawn for 6"):
        draws.apply(patches[:5])


def test_on_device_augmentation_gives_the_loader_processes_pixels(tiny_shards, train_store):
    """AUG.WHERE only moves the work: the same draws applied to a collated batch (on the CPU here) give the
    patches the loader would have shipped augmented."""
    in_loader = collate(list(_stream(tiny_shards, train_store)))
    deferred = collate(list(_stream(tiny_shards, train_store, view=View(2, HEAVY_AUG, aug_on_device=True))))
    assert in_loader.aug is None and deferred.aug is not None and len(deferred.aug) == len(deferred.patches)
    assert in_loader.keys == deferred.keys and torch.equal(in_loader.boxes, deferred.boxes)
    assert not torch.equal(deferred.patches, in_loader.patches)  # shipped as cut
    assert torch.equal(deferred.aug.apply(deferred.patches), in_loader.patches)


def test_the_accelerator_path_runs_through_on_the_meta_device():
    """Off the CPU, JPEG is the simulation and every small array travels to the device: run there on PyTorch's
    `meta` device (shapes and dtypes only, no data), so this path is exercised without a GPU."""
    draws = AugDraws.draw(6, AugConfig(FLIP_PROB=0.5, BLUR_PROB=0.5, JPEG_PROB=1.0, NOISE_PROB=0.0),
                          np.random.default_rng(0))  # fmt: skip
    out = draws.apply(torch.empty(6, 224, 224, 3, dtype=torch.uint8, device="meta"))
    assert out.shape == (6, 224, 224, 3) and out.dtype == torch.uint8 and out.is_meta
    assert simulated_jpeg(torch.empty(2, 101, 77, 3, dtype=torch.uint8, device="meta"), [50, 90]).shape == (
        2,
        101,
        77,
        3,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentation_on_cuda_never_waits_and_agrees_with_the_cpu():
    images = [synthetic_photo(224, 224, seed) for seed in range(4)]
    cpu = torch.from_numpy(np.stack(images))
    jpeg_only = AugDraws.draw(4, AugConfig(FLIP_PROB=0.5, BLUR_PROB=0.0, JPEG_PROB=1.0, NOISE_PROB=0.0),
                              np.random.default_rng(1))  # fmt: skip
    blur = AugDraws.draw(4, AugConfig(FLIP_PROB=0.0, BLUR_PROB=1.0, JPEG_PROB=0.0, NOISE_PROB=0.0),
                         np.random.default_rng(2))  # fmt: skip
    gpu = cpu.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        compressed, blurred = jpeg_only.apply(gpu), blur.apply(gpu)
        noisy = add_noise(gpu, np.full(len(images), 0.05), np.arange(len(images)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(compressed.cpu(), jpeg_only.apply(cpu))  # integer arithmetic: the codec's very pixels
    assert (blurred.cpu().int() - blur.apply(cpu).int()).abs().max() <= 1  # float rounding of the two devices
    noise = noisy.cpu().int() - cpu.int()
    assert abs(noise[(cpu > 40) & (cpu < 215)].float().std().item() - 0.05 * 255) < 0.5
