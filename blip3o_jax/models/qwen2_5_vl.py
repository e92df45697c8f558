"""Qwen2.5-VL backbone: text decoder and vision tower (reference sections 3.2, 4). Work in progress."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class QwenTextConfig:
    """transformers Qwen2.5-VL text field names; defaults = Qwen2.5-VL-7B-Instruct resized for BLIP3-o."""

    vocab_size: int = 151668
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple = (16, 24, 24)
    tie_word_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """transformers Qwen2.5-VL vision_config field names; defaults = the released 7B/3B tower."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rms_norm_eps: float = 1e-6
