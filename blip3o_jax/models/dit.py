"""NextDiT cross-attention flow head of BLIP3-o (reference section 5). Work in progress."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Field names of the reference's NextDiTCrossAttnConfig; defaults = the released 8B head."""

    input_size: int = 8  # grid side: N = input_size**2 target tokens (8x8 = 64 EVA tokens)
    patch_size: int = 1
    in_channels: int = 1792  # target feature width (EVA-CLIP-E) or VAE latent channels
    dim: int = 1792
    n_layers: int = 24
    n_heads: int = 28
    n_kv_heads: int = 28
    multiple_of: int = 256
    ffn_dim_multiplier: float = 0.0  # 0 = None in the reference (no extra multiplier)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    latent_embedding_size: int = 3584  # width C of the condition z (LLM hidden size)
    rope_theta: float = 10000.0
