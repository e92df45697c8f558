"""SigLIP2 vision encoder as an alternative generation target (reference section 8.3). Work in progress."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Siglip2Config:
    """transformers Siglip2VisionConfig field names; defaults = siglip2-so400m-patch16-512."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 1024  # learned position-embedding grid = sqrt(num_patches)^2
    image_size: int = 512
    layer_norm_eps: float = 1e-6
    feature_layer: int = -2  # hidden_states index used as features (-2 = penultimate layer output)
    num_pooled_tokens: int = 64  # adaptive average pooling of the token grid
