"""Image preprocessing for the target encoders, in numpy + PIL (docs/model.md 8.1, 8.3).

Pure, deterministic functions of the input image: safe in Grain worker processes (no jax import, the
preprocessors are frozen dataclasses that pickle). Output is float32 NHWC, already normalized with
the encoder's mean/std, i.e. what ``target_features(images)`` expects (contract.md section 2).

Two geometric modes, both with PIL's antialiased bicubic resampling:
  "center_crop"  EVA-CLIP training pipeline (torchvision ``Resize(S)`` + ``CenterCrop(S)``): the shorter
                 side is resized to S (longer side ``int(S * long / short)``), then the centre S x S is
                 cut with torchvision's offsets ``round((H - S) / 2)``, ``round((W - S) / 2)``.
  "squash"       Emu2-style decoder pipelines (``Resize((S, S))``): both sides to S, aspect ignored.
Then uint8 -> [0, 1] -> (x - mean) / std per channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # EVA-CLIP / OpenAI CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP2: maps [0, 1] to [-1, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)

MODES = ("center_crop", "squash")
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_pil_rgb(image) -> Image.Image:
    """A PIL image or a uint8 array (H, W), (H, W, 3) or (H, W, 4) -> an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"images must be PIL images or uint8 arrays, got an array of {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be (H, W), (H, W, 3) or (H, W, 4), got {array.shape}")
    return Image.fromarray(array).convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """torchvision ``Resize(size)``: shorter side -> size, longer side -> int(size * long / short)."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return image.resize((new_w, new_h), RESAMPLE[resample])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` of an image at least ``size`` on each side."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"cannot center-crop {size}x{size} from a {w}x{h} image")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(image: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB -> float32 (H, W, 3): x / 255, then (x - mean) / std per channel."""
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """Picklable image -> normalized (size, size, 3) float32 array; ``batch`` stacks several."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    mode: str = "center_crop"
    resample: str = "bicubic"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown preprocessing mode {self.mode!r}; allowed: {list(MODES)}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; allowed: {sorted(RESAMPLE)}")
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")

    def geometry(self, image) -> Image.Image:
        """The resized / cropped RGB image, still uint8 (useful for saving what the encoder sees)."""
        image = to_pil_rgb(image)
        if self.mode == "squash":
            return image.resize((self.size, self.size), RESAMPLE[self.resample])
        return center_crop(resize_shorter_side(image, self.size, self.resample), self.size)

    def __call__(self, image) -> np.ndarray:
        return normalize(self.geometry(image), self.mean, self.std)

    def batch(self, images) -> np.ndarray:
        """A sequence of images (any sizes) -> (B, size, size, 3) float32."""
        if not len(images):
            return np.zeros((0, self.size, self.size, 3), np.float32)
        return np.stack([self(im) for im in images])


def for_encoder(encoder: str, size: int, mode: str = "center_crop") -> ImagePreprocessor:
    """The preprocessor of a target encoder ('eva_clip' or 'siglip2', as config.model.target_encoder)."""
    if encoder == "eva_clip":
        return ImagePreprocessor(size, CLIP_MEAN, CLIP_STD, mode)
    if encoder == "siglip2":
        return ImagePreprocessor(size, SIGLIP_MEAN, SIGLIP_STD, mode)
    raise ValueError(f"unknown target encoder {encoder!r}; allowed: ['eva_clip', 'siglip2']")
