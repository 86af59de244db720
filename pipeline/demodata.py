"""A synthetic stand-in data set for the demo: real photo crops and generator-like re-syntheses of them.

Reals are crops of photographs (never upscaled: resampling is the very trace the fakes carry). Fakes are
the same crops passed through decoder-like upsamplers with fixed random kernels, so reals and fakes share
content, size and encoding and only the generation trace separates them. Not a benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# photo name in skimage.data -> caption (gives the semantic-consistency loss real captions)
PHOTOS = {
    "astronaut": "a portrait of an astronaut in a spacesuit",
    "chelsea": "a photo of a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on a launch pad",
    "immunohistochemistry": "a stained tissue sample under a microscope",
    "hubble_deep_field": "a field of galaxies in deep space",
    "retina": "a fundus photograph of a retina",
}
CROP_SIDES = (160, 200, 224, 256, 320, 384, 448, 512, 640)  # even, so a 2x down/up round trip is exact in size
GENERATORS = ("tconv", "nearest", "bilinear")


def synthetic_photo(width: int, height: int, seed: int, grain: int = 10) -> np.ndarray:
    """(H, W, 3) uint8 of smooth random content (upsampled colour noise) plus grain: encodes to photo-like
    JPEG and PNG sizes. For tests and benchmarks, where content does not matter (more chroma detail than
    photos have)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-grain, grain, img.shape) if grain else img, 0, 255).astype(np.uint8)


@dataclass
class DemoImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    label: int  # 0 real, 1 fake
    generator: str  # the photo's name for reals, the decoder kind for fakes
    group: str  # a fake shares its source crop's group, hence its split
    caption: str


def load_photos() -> dict[str, np.ndarray]:
    import skimage.data  # the photos ship inside scikit-image: no download

    return {name: getattr(skimage.data, name)()[..., :3] for name in PHOTOS}


def _decoder_kernels(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # transposed-conv kernel: bilinear taps + fixed noise, each of the 4 output phases normalised to sum 1,
    # so brightness is kept but the phases differ -> the checkerboard trace of learned upsamplers
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    k = torch.outer(taps, taps).expand(3, 1, 4, 4).clone() + 0.15 * torch.randn(3, 1, 4, 4, generator=g)
    for py in range(2):
        for px in range(2):
            k[:, :, py::2, px::2] /= k[:, :, py::2, px::2].sum(dim=(-2, -1), keepdim=True)
    smooth = torch.full((3, 1, 3, 3), 1 / 9) + 0.05 * torch.randn(3, 1, 3, 3, generator=g)
    smooth /= smooth.sum(dim=(-2, -1), keepdim=True)
    return {"tconv": k, "smooth": smooth}


def resynthesise(rgb: np.ndarray, kind: str, kernels: dict[str, torch.Tensor]) -> np.ndarray:
    """Downsample 2x, then upsample the way a generator's decoder would; output has the input's size."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    down = F.avg_pool2d(x, 2)
    if kind == "tconv":
        up = F.conv_transpose2d(down, kernels["tconv"], stride=2, padding=1, groups=3)
    else:
        up = F.interpolate(down, scale_factor=2, mode=kind, **({"align_corners": False} if kind == "bilinear" else {}))
        up = F.conv2d(F.pad(up, (1, 1, 1, 1), mode="replicate"), kernels["smooth"], groups=3)
    return (up[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def make_demo_set(crops_per_photo: int = 6, seed: int = 0) -> list[DemoImage]:
    """Reals: random crops of each photo, sides from under 224 up to what the photo allows.
    Fakes: each crop re-synthesised by one of the decoder kinds, in turn."""
    rng = np.random.default_rng(seed)
    kernels = _decoder_kernels(seed)
    images: list[DemoImage] = []
    n = 0
    for name, photo in load_photos().items():
        h, w = photo.shape[:2]
        for i in range(crops_per_photo):
            ch = int(rng.choice([s for s in CROP_SIDES if s <= h]))
            cw = int(rng.choice([s for s in CROP_SIDES if s <= w]))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = np.ascontiguousarray(photo[y : y + ch, x : x + cw])
            group, caption = f"{name}-{i}", PHOTOS[name]
            kind = GENERATORS[n % len(GENERATORS)]
            n += 1
            images.append(DemoImage(crop, 0, name, group, caption))
            images.append(DemoImage(resynthesise(crop, kind, kernels), 1, kind, group, caption))
    return images
