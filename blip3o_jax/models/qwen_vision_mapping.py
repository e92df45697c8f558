"""PyTorch <-> NNX mapping of the Qwen2.5-VL vision tower (models/qwen_vision.py, docs/model.md 10.1).

Maps transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` names under ``visual.`` (the released
transformers-4.51 naming, also what transformers 5 ``save_pretrained`` writes; transformers-5 in-memory
names put the same under ``model.visual.``) onto ``QwenVisionTower`` paths: dots become ``/``,
``weight`` becomes ``kernel`` (transposed; the patch Conv3d as "conv3d") or ``scale``, the merger's
``mlp.0`` / ``mlp.2`` are ``mlp/layers/0`` / ``mlp/layers/2`` (an nnx.Sequential), and ``blocks.{i}.*``
fills one array stacked along the leading 'layers' axis. The whole Qwen2.5-VL model (qwen_mapping.py)
uses this table under ``visual.`` / ``visual/``.

Rule of the table: every weight is mapped exactly once; weights.load_component checks coverage both
ways (every missing, unexpected and mis-shaped key in one error) before reading any tensor.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.models.qwen_vision import QwenVisionConfig, QwenVisionTower
from blip3o_jax.weights import Rule

PREFIX = "visual."

# torch key relative to PREFIX -> NNX path of QwenVisionTower.
RULES: tuple[Rule, ...] = (
    Rule("patch_embed.proj.weight", "patch_embed/proj/kernel", "conv3d"),
    Rule("blocks.{i}.norm1.weight", "blocks/norm1/scale"),
    Rule("blocks.{i}.norm2.weight", "blocks/norm2/scale"),
    Rule("blocks.{i}.attn.qkv.weight", "blocks/attn/qkv/kernel", "linear"),
    Rule("blocks.{i}.attn.qkv.bias", "blocks/attn/qkv/bias"),
    Rule("blocks.{i}.attn.proj.weight", "blocks/attn/proj/kernel", "linear"),
    Rule("blocks.{i}.attn.proj.bias", "blocks/attn/proj/bias"),
    Rule("blocks.{i}.mlp.gate_proj.weight", "blocks/mlp/gate_proj/kernel", "linear"),
    Rule("blocks.{i}.mlp.gate_proj.bias", "blocks/mlp/gate_proj/bias"),
    Rule("blocks.{i}.mlp.up_proj.weight", "blocks/mlp/up_proj/kernel", "linear"),
    Rule("blocks.{i}.mlp.up_proj.bias", "blocks/mlp/up_proj/bias"),
    Rule("blocks.{i}.mlp.down_proj.weight", "blocks/mlp/down_proj/kernel", "linear"),
    Rule("blocks.{i}.mlp.down_proj.bias", "blocks/mlp/down_proj/bias"),
    Rule("merger.ln_q.weight", "merger/ln_q/scale"),
    Rule("merger.mlp.0.weight", "merger/mlp/layers/0/kernel", "linear"),
    Rule("merger.mlp.0.bias", "merger/mlp/layers/0/bias"),
    Rule("merger.mlp.2.weight", "merger/mlp/layers/2/kernel", "linear"),
    Rule("merger.mlp.2.bias", "merger/mlp/layers/2/bias"),
)


def rules(cfg: QwenVisionConfig) -> list[Rule]:
    del cfg  # every tower size has the same table
    return list(RULES)


def load(
    ckpt,
    cfg: QwenVisionConfig,
    mesh,
    rule_table: str = "replicated",
    *,
    prefix: str = PREFIX,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> QwenVisionTower:
    """A QwenVisionTower filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one; keys under
    ``prefix``, ``"model.visual."`` for transformers-5 in-memory names), every tensor streamed into its
    sharding on ``mesh`` under the rule table ``rule_table`` (sharding.RULE_TABLES)."""
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: QwenVisionTower(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)),
        mesh, sharding.rules_for(rule_table))
    state = weights.load_component(ckpt, rules(cfg), abstract, prefix=prefix, where="Qwen2.5-VL vision tower")
    return nnx.merge(graphdef, state)
