"""PyTorch <-> NNX mapping of the SigLIP2 vision encoder (models/siglip2.py, docs/model.md 8.3).

Maps transformers-5 ``Siglip2VisionModel`` names (``embeddings.*``, ``encoder.layers.{i}.*``,
``post_layernorm.*``) onto ``Siglip2VisionModel`` paths: dots become ``/``, ``weight`` becomes
``kernel`` (transposed; the patch embedding is an nn.Linear over flattened patches), ``scale`` or
``embedding``, and ``encoder.layers.{i}.*`` fills one array stacked along the leading 'layers' axis.
The vision model's state_dict and its ``save_pretrained`` files (transformers 5) carry no prefix; the
Hub's whole-``Siglip2Model`` files (e.g. google/siglip2-so400m-patch16-512) put the same names under
``vision_model.`` next to ``text_model.*`` and ``logit_*``, which lie outside the prefix and are not
looked at. ``load`` detects the prefix.

Rule of the table: every weight is mapped exactly once; weights.load_component checks coverage both
ways before reading any tensor. The attention-pooling ``head.*`` is not part of the target and is
ignored; anything else missing, unexpected or mis-shaped raises ``weights.CheckpointMismatchError``.
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.models.siglip2 import Siglip2Config, Siglip2VisionModel
from blip3o_jax.weights import Rule

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


def load(
    ckpt,
    cfg: Siglip2Config,
    mesh,
    rule_table: str = "replicated",
    *,
    prefix: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> Siglip2VisionModel:
    """A Siglip2VisionModel filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one), every
    tensor streamed into its sharding on ``mesh`` under the rule table ``rule_table``
    (sharding.RULE_TABLES). ``prefix=None`` detects it."""
    if prefix is None:
        prefix = detect_prefix(ckpt.keys())
    ignore = [re.escape(prefix) + p for p in UNUSED]
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: Siglip2VisionModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)),
        mesh, sharding.rules_for(rule_table))
    state = weights.load_component(ckpt, rules(cfg), abstract, prefix=prefix, ignore=ignore,
                                   where=f"SigLIP2 vision encoder, prefix {prefix!r}")
    return nnx.merge(graphdef, state)
