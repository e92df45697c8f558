"""Qwen2.5-VL image preprocessing in numpy + PIL (reference sections 3.2, 3.3a).

Equal, value for value, to transformers 5.23's PIL-backend ``Qwen2VLImageProcessorPil`` (the class the
Qwen2.5-VL processor uses with ``backend="pil"``; the default torchvision backend resizes with torch's
antialiased bicubic and differs from PIL by a few 1/255 steps):

1. convert to RGB (transparency composited onto white),
2. ``smart_resize``: both sides multiples of patch_size * merge_size (28), aspect ratio kept, pixel count
   inside [min_pixels, max_pixels]; PIL bicubic resize of the uint8 image,
3. rescale by 1/255 (in float64, then float32) and normalise with the OpenAI CLIP mean/std,
4. duplicate the frame to ``temporal_patch_size`` (2) frames and flatten to one row per 14x14 patch,
   rows ordered by 2x2 merge block: (block row, block col, row in block, col in block); each row is
   (C, T, 14, 14) flattened -> 3*2*14*14 = 1176 values.

Output: ``pixel_values (sum of patches, 1176) float32`` and ``image_grid_thw (n_images, 3) int64`` with
rows (1, h/14, w/14), the inputs of QwenVisionTower and get_rope_index.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2.5-VL-{3B,7B}-Instruct preprocessor_config.json.
RELEASED_MIN_PIXELS = 56 * 56
RELEASED_MAX_PIXELS = 28 * 28 * 16384
# BLIP3-o's understanding evaluation (lmms-eval) overrides them (docs/model.md 3.2).
EVAL_MIN_PIXELS = 256 * 28 * 28
EVAL_MAX_PIXELS = 2048 * 28 * 28


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280):
    """(h, w) divisible by ``factor``, close to the input aspect ratio, pixel count in [min, max]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """PIL RGB image; alpha is composited onto white as transformers does. Arrays: (H, W, 3) uint8 RGB."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise TypeError(f"numpy images must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass(frozen=True)
class QwenImageProcessor:
    min_pixels: int = RELEASED_MIN_PIXELS
    max_pixels: int = RELEASED_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD

    def patchify(self, image: np.ndarray) -> np.ndarray:
        """(C, H, W) float32 -> (H/p * W/p, C*T*p*p) in the processor's merge-block row order."""
        c, h, w = image.shape
        p, m = self.patch_size, self.merge_size
        gh, gw = h // p, w // p
        x = image.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (block row, block col, row in block, col in block, C, p, p)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], self.temporal_patch_size, p, p))
        return x.reshape(gh * gw, c * self.temporal_patch_size * p * p)

    def preprocess_one(self, image: Image.Image | np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        image = to_rgb(image)
        h, w = smart_resize(
            image.height, image.width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        pixels = np.asarray(image.resize((w, h), resample=Image.Resampling.BICUBIC))  # (h, w, 3) uint8
        x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32).transpose(2, 0, 1)
        mean = np.asarray(self.image_mean, np.float32)[:, None, None]
        std = np.asarray(self.image_std, np.float32)[:, None, None]
        x = (x - mean) / std
        return self.patchify(x), (1, h // self.patch_size, w // self.patch_size)

    def __call__(self, images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray]) -> dict[str, np.ndarray]:
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        rows, grids = zip(*(self.preprocess_one(im) for im in images))
        return {
            "pixel_values": np.concatenate(rows, axis=0),
            "image_grid_thw": np.asarray(grids, dtype=np.int64),
        }
