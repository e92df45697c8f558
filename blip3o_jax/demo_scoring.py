"""Reads colour, shape and position off a demo image with plain pixel statistics.

The demo's generation score must not trust any of the models it evaluates, so generated pictures are
judged the way a person would: which of the palette's colours the non-background pixels are closest
to, where their centre of mass sits, and how much of their bounding box they fill (a square fills
all of it, a circle pi/4, a triangle half). Calibrated on the renderer of ``data.synthetic``: on
its own images this scorer is right essentially always (tests/test_demo_scoring.py).
"""

from __future__ import annotations

import numpy as np

from blip3o_jax.data.synthetic import COLORS, POSITIONS

_PALETTE = np.asarray(list(COLORS.values()), np.float32)
_NAMES = list(COLORS)
# Fill ratio of the bounding box: square 1.0, circle pi/4 ~ 0.785, triangle 0.5.
_FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def object_mask(image: np.ndarray, background_threshold: float = 60.0) -> np.ndarray:
    """Pixels that differ clearly from the white background."""
    rgb = np.asarray(image, np.float32)[..., :3]
    return np.linalg.norm(255.0 - rgb, axis=-1) > background_threshold


def score_image(image: np.ndarray) -> dict:
    """{"color", "shape", "position"} read off an (H, W, 3) uint8 image of one object (None if empty)."""
    rgb = np.asarray(image, np.float32)[..., :3]
    mask = object_mask(rgb)
    if mask.sum() < 4:
        return {"color": None, "shape": None, "position": None}
    pixels = rgb[mask]
    # Each object pixel votes for its nearest palette colour (robust to blur at the edges).
    votes = np.argmin(((pixels[:, None] - _PALETTE[None]) ** 2).sum(-1), axis=1)
    color = _NAMES[int(np.bincount(votes, minlength=len(_NAMES)).argmax())]
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() / w, ys.mean() / h
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box
    shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
    return {"color": color, "shape": shape, "position": position}


def accuracy(images, objects) -> dict:
    """Per-attribute accuracy of generated images against the prompts' single objects."""
    hits = {"color": 0, "shape": 0, "position": 0}
    for image, obj in zip(images, objects):
        read = score_image(image)
        for k in hits:
            hits[k] += int(read[k] == obj[k])
    n = max(len(objects), 1)
    return {f"{k}_accuracy": v / n for k, v in hits.items()} | {"n": len(objects)}
