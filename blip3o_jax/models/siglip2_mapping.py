"""PyTorch <-> NNX mapping for the SigLIP2 vision encoder (siglip2.py, reference 8.3).

Names are transformers' ``Siglip2VisionModel``. Its state_dict and its ``save_pretrained`` files
(transformers 5) carry no prefix (``embeddings.patch_embedding.weight``,
``encoder.layers.{i}.self_attn.q_proj.weight``, ...); the Hub's whole-``Siglip2Model`` files (e.g.
google/siglip2-so400m-patch16-512) put them under ``vision_model.`` next to ``text_model.*`` and
``logit_*``, which lie outside the prefix and are not looked at.
``load_siglip2`` detects the prefix. The attention-pooling ``head.*`` is not part of the target and is
ignored; anything else missing, unexpected or mis-shaped raises ``weights.CheckpointMismatchError``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
from flax import nnx

from blip3o_jax.models.siglip2 import Siglip2Config
from blip3o_jax.weights import Rule, export_component, load_component

HUB_PREFIX = "vision_model."
UNUSED = (r"head\.",)  # Siglip2MultiheadAttentionPoolingHead (vision_use_head)

RULES = [
    Rule("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel", "linear"),
    Rule("embeddings.patch_embedding.bias", "embeddings/patch_embedding/bias"),
    Rule("embeddings.position_embedding.weight", "embeddings/position_embedding/embedding"),
    *[
        Rule(f"encoder.layers.{{i}}.{torch_name}.{p}", f"encoder/layers/{torch_name.replace('.', '/')}/{n}", t)
        for torch_name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                           "mlp.fc1", "mlp.fc2")
        for p, n, t in (("weight", "kernel", "linear"), ("bias", "bias", "none"))
    ],
    *[
        Rule(f"encoder.layers.{{i}}.{norm}.{p}", f"encoder/layers/{norm}/{n}")
        for norm in ("layer_norm1", "layer_norm2")
        for p, n in (("weight", "scale"), ("bias", "bias"))
    ],
    Rule("post_layernorm.weight", "post_layernorm/scale"),
    Rule("post_layernorm.bias", "post_layernorm/bias"),
]


def rules(cfg: Siglip2Config) -> list[Rule]:
    del cfg  # every SigLIP2 size has the same table
    return list(RULES)


def detect_prefix(keys) -> str:
    return HUB_PREFIX if any(k.startswith(HUB_PREFIX) for k in keys) else ""


def load_siglip2(ckpt, abstract_state: nnx.State, cfg: Siglip2Config, *, prefix: str | None = None) -> nnx.State:
    """Fills a Siglip2VisionModel state (ShapeDtypeStructs with shardings) from a ``TorchCheckpoint``."""
    if prefix is None:
        prefix = detect_prefix(ckpt.keys())
    ignore = [re.escape(prefix) + p for p in UNUSED]
    return load_component(ckpt, rules(cfg), abstract_state, prefix=prefix, ignore=ignore,
                          where=f"SigLIP2 vision encoder, prefix {prefix!r}")


def export_siglip2(state: nnx.State, cfg: Siglip2Config, prefix: str = HUB_PREFIX) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, numpy tensor) pairs in transformers' naming (a Siglip2VisionModel without head)."""
    return export_component(rules(cfg), state, prefix)
