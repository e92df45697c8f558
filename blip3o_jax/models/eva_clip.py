"""EVA-CLIP vision transformer, the BLIP3-o generation target (reference section 8.1). Work in progress."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """EVA-CLIP json field names; defaults = EVA-CLIP-E/14-plus at 448 px as used by BLIP3-o."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    head_width: int = 112
    mlp_ratio: float = 8.571428571428571
    postnorm: bool = True
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pooling: str = "early_pool2d_4"  # 4x4 average pooling of the token grid -> 8x8 = 64 tokens
