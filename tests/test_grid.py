"""The patch grid (SPAI's rule): patch counts, five-crop for small images, padding, crops equal box slices."""

from __future__ import annotations

import numpy as np
import pytest

from semspai.pipeline.grid import DEFAULT_RULE, PatchRule, crop_patches, grid_boxes, pad_image, padded_size

S = 224


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def five_crop(h: int, w: int) -> list[tuple[int, int, int, int]]:
    cy, cx = (h - S) // 2, (w - S) // 2
    return [(0, 0, S, S), (w - S, 0, w, S), (0, h - S, S, h), (w - S, h - S, w, h), (cx, cy, cx + S, cy + S)]


def test_512_square_gives_a_2x2_grid():
    boxes = grid_boxes(512, 512)
    assert boxes.dtype == np.int32 and boxes.shape == (4, 4)
    assert boxes.tolist() == [[0, 0, 224, 224], [224, 0, 448, 224], [0, 224, 224, 448], [224, 224, 448, 448]]


def test_224_square_gives_five_identical_crops():
    patches, boxes = crop_patches(img := image(224, 224))
    assert boxes.tolist() == [[0, 0, 224, 224]] * 5
    assert patches.shape == (5, 224, 224, 3)
    assert all(np.array_equal(p, img) for p in patches)


def test_small_image_is_reflect_padded_then_five_cropped():
    img = image(80, 100)  # H=80, W=100
    assert padded_size(80, 100) == (224, 224)
    padded = pad_image(img)
    assert padded.shape == (224, 224, 3)
    np.testing.assert_array_equal(padded[:80, :100], img)  # padding only at the bottom/right
    # reflect: mirrored about the last row/column, which is not repeated
    np.testing.assert_array_equal(padded[80:159, :100], img[78::-1])
    np.testing.assert_array_equal(padded[:80, 100:199], img[:, 98::-1])
    patches, boxes = crop_patches(img)
    assert boxes.tolist() == [[0, 0, 224, 224]] * 5
    assert patches.shape == (5, 224, 224, 3)


def test_full_hd_gives_8x4_with_remainders_dropped():
    boxes = grid_boxes(1080, 1920)
    assert boxes.shape == (32, 4)
    assert sorted({int(b[0]) for b in boxes}) == [224 * i for i in range(8)]
    assert sorted({int(b[1]) for b in boxes}) == [224 * i for i in range(4)]
    assert boxes[:, 2].max() == 8 * 224 <= 1920 and boxes[:, 3].max() == 4 * 224 <= 1080
    assert boxes[:8, 1].tolist() == [0] * 8  # row-major from the top-left corner


@pytest.mark.parametrize(
    "h,w,n",
    [
        (448, 448, 4),
        (447, 448, 5),
        (448, 671, 4),
        (672, 448, 6),
        (300, 1000, 4),
        (100, 1000, 4),
        (224, 672, 5),
        (1, 1, 5),
        (3840, 2160, 9 * 17),
        (225, 225, 5),
    ],
)
def test_patch_counts_and_bounds(h, w, n):
    boxes = grid_boxes(h, w)
    ph, pw = padded_size(h, w)
    assert len(boxes) == n
    assert (boxes[:, 2] - boxes[:, 0] == S).all() and (boxes[:, 3] - boxes[:, 1] == S).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= pw).all() and (boxes[:, 3] <= ph).all()
    if n == 5 and (ph // S) * (pw // S) < 4:
        assert boxes.tolist() == [list(b) for b in five_crop(ph, pw)]


@pytest.mark.parametrize("h,w", [(512, 512), (300, 700), (100, 80), (230, 224), (1, 300), (600, 257)])
def test_crop_patches_equal_box_slices_of_the_padded_image(h, w):
    img = image(h, w, seed=h + w)
    patches, boxes = crop_patches(img)
    padded = pad_image(img)
    assert padded.shape[:2] == padded_size(h, w)
    assert patches.dtype == img.dtype and patches.shape == (len(boxes), S, S, 3)
    for p, (x0, y0, x1, y1) in zip(patches, boxes, strict=True):
        np.testing.assert_array_equal(p, padded[y0:y1, x0:x1])
    np.testing.assert_array_equal(padded[:h, :w], img)


def test_large_image_is_not_padded():
    img = image(300, 400)
    assert pad_image(img) is img


def test_custom_rule_and_id():
    rule = PatchRule(size=32, stride=16, min_patches=2)
    boxes = grid_boxes(64, 64, rule)
    assert len(boxes) == 9 and boxes[1].tolist() == [16, 0, 48, 32]
    assert rule.id != DEFAULT_RULE.id and rule.id == PatchRule(32, 16, 2).id
    assert DEFAULT_RULE.to_dict() == {"size": 224, "stride": 224, "min_patches": 4, "pad_mode": "reflect"}
