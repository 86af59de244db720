"""The patch grid (SPAI's rule), shared by the CLIP local vectors and the spectral branch.

One function decides which 224-px patches an image yields, so a cached local CLIP vector always
describes exactly the pixels of its spectral patch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class PatchRule:
    size: int = 224  # the spectral encoder's input; also CLIP's local crop before any resize
    stride: int = 224  # non-overlapping, as in SPAI
    min_patches: int = 4  # fewer grid patches than this -> five-crop instead (SPAI's small-image rule)
    pad_mode: str = "reflect"  # sides shorter than `size` are padded at the bottom/right

    @property
    def id(self) -> str:
        """A string that changes whenever the rule would give other patches (recorded in stores)."""
        return f"grid{self.size}-stride{self.stride}-min{self.min_patches}-fivecrop-pad{self.pad_mode}"

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_RULE = PatchRule()
MOSTLY_PADDING = 0.5  # an image over this share of padding is still scored, with a warning that it says little


def padded_size(height: int, width: int, rule: PatchRule = DEFAULT_RULE) -> tuple[int, int]:
    return max(height, rule.size), max(width, rule.size)


def padding_share(height: int, width: int, rule: PatchRule = DEFAULT_RULE) -> float:
    """Share of the padded image that is padding: 0 for images at least `rule.size` on each side."""
    h, w = padded_size(height, width, rule)
    return 1 - height * width / (h * w)


def mostly_padding(height: int, width: int, rule: PatchRule = DEFAULT_RULE) -> bool:
    """Over half the image's patch pixels would be padding (a thumbnail, a thin strip): its score says little."""
    return padding_share(height, width, rule) > MOSTLY_PADDING


def grid_boxes(height: int, width: int, rule: PatchRule = DEFAULT_RULE) -> np.ndarray:
    """Patch boxes (P, 4) as int32 `x0, y0, x1, y1` in the padded image's pixel coordinates.

    Grid from the top-left corner, right and bottom remainders dropped; when that gives fewer than
    `rule.min_patches` patches, the four corners and the centre are used (so 224x224 gives 5 equal crops).
    """
    h, w = padded_size(height, width, rule)
    s, st = rule.size, rule.stride
    ys = range(0, h - s + 1, st)
    xs = range(0, w - s + 1, st)
    boxes = [(x, y, x + s, y + s) for y in ys for x in xs]
    if len(boxes) < rule.min_patches:
        cy, cx = (h - s) // 2, (w - s) // 2
        boxes = [(0, 0, s, s), (w - s, 0, w, s), (0, h - s, s, h), (w - s, h - s, w, h), (cx, cy, cx + s, cy + s)]
    return np.asarray(boxes, dtype=np.int32).reshape(-1, 4)


def distinct_boxes(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, inverse) for boxes (P, 4): `boxes[first]` the distinct boxes in order of first occurrence and
    `boxes[first][inverse]` equal to boxes. The five-crop of an image 224 px on a side repeats boxes."""
    _, first, inverse = np.unique(boxes, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts by value: back to the image's patch order
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.reshape(-1)]


def pad_image(image: np.ndarray, rule: PatchRule = DEFAULT_RULE) -> np.ndarray:
    """Pad an (H, W, C) image at the bottom/right to at least `rule.size` on each side."""
    h, w = image.shape[:2]
    ph, pw = padded_size(h, w, rule)
    if (ph, pw) == (h, w):
        return image
    # numpy's reflect repeats the reflection when the pad exceeds the side (torch's refuses)
    return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode=rule.pad_mode)


def crop_patches(image: np.ndarray, rule: PatchRule = DEFAULT_RULE) -> tuple[np.ndarray, np.ndarray]:
    """Cut an (H, W, C) image into its grid patches: (P, size, size, C) and their boxes (P, 4)."""
    padded = pad_image(image, rule)
    boxes = grid_boxes(image.shape[0], image.shape[1], rule)
    patches = np.stack([padded[y0:y1, x0:x1] for x0, y0, x1, y1 in boxes])
    return patches, boxes
