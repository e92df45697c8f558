"""PyTorch <-> NNX mapping of the DiT head: released keys ``model.dit.model.*`` (reference 5.6).

One Rule per tensor; ``{i}`` is the block index of the stacked 'layers' axis. Nothing else is in the
released checkpoint: no ``attn1.to_out`` (self-attention shares ``attn2.to_out.0``), no
``norm_out.norm`` (no affine), no ``pad_token`` and no ``freqs_cis`` (the RoPE table is recomputed).
A state dict of stock diffusers' ``LuminaNextDiT2DModel`` additionally holds ``pad_token``, which is
unused; drop it (or pass it in ``ignore``) before loading.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.models.dit import DiT, DiTConfig
from blip3o_jax.weights import Rule

PREFIX = "model.dit.model."


def _block_rules() -> list[Rule]:
    rules = [Rule("layers.{i}.gate", "layers/gate")]
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v"):
            rules.append(Rule(f"layers.{{i}}.{attn}.{proj}.weight", f"layers/{attn}/{proj}/kernel", "linear"))
        for norm in ("norm_q", "norm_k"):
            rules.append(Rule(f"layers.{{i}}.{attn}.{norm}.weight", f"layers/{attn}/{norm}/scale"))
            rules.append(Rule(f"layers.{{i}}.{attn}.{norm}.bias", f"layers/{attn}/{norm}/bias"))
    rules.append(Rule("layers.{i}.attn2.to_out.0.weight", "layers/attn2/to_out/kernel", "linear"))
    for lin in ("linear_1", "linear_2", "linear_3"):
        rules.append(Rule(f"layers.{{i}}.feed_forward.{lin}.weight", f"layers/feed_forward/{lin}/kernel", "linear"))
    rules += [
        Rule("layers.{i}.norm1.linear.weight", "layers/norm1/linear/kernel", "linear"),
        Rule("layers.{i}.norm1.linear.bias", "layers/norm1/linear/bias"),
        Rule("layers.{i}.norm1.norm.weight", "layers/norm1/norm/scale"),
    ]
    for norm in ("ffn_norm1", "norm2", "ffn_norm2", "norm1_context"):
        rules.append(Rule(f"layers.{{i}}.{norm}.weight", f"layers/{norm}/scale"))
    return rules


def _linear(torch_name: str, nnx_path: str) -> list[Rule]:
    """A biased nn.Linear."""
    return [
        Rule(f"{torch_name}.weight", f"{nnx_path}/kernel", "linear"),
        Rule(f"{torch_name}.bias", f"{nnx_path}/bias"),
    ]


RULES: tuple[Rule, ...] = tuple(
    _linear("caption_projection.linear_1", "caption_projection/linear_1")
    + _linear("caption_projection.linear_2", "caption_projection/linear_2")
    + _linear("patch_embedder.proj", "patch_embedder/proj")
    + _linear("time_caption_embed.timestep_embedder.linear_1", "time_caption_embed/timestep_embedder/linear_1")
    + _linear("time_caption_embed.timestep_embedder.linear_2", "time_caption_embed/timestep_embedder/linear_2")
    + [
        Rule("time_caption_embed.caption_embedder.0.weight", "time_caption_embed/caption_norm/scale"),
        Rule("time_caption_embed.caption_embedder.0.bias", "time_caption_embed/caption_norm/bias"),
    ]
    + _linear("time_caption_embed.caption_embedder.1", "time_caption_embed/caption_linear")
    + _block_rules()
    + _linear("norm_out.linear_1", "norm_out/linear_1")
    + _linear("norm_out.linear_2", "norm_out/linear_2")
)


def rules(cfg: DiTConfig | None = None, nnx_prefix: str = "") -> list[Rule]:
    """The rules, without the q/k-norm ones when ``cfg.qk_norm`` is False; NNX paths under ``nnx_prefix``
    (e.g. ``"dit/"`` when the DiT is the ``dit`` attribute of a larger module)."""
    qk_norm = cfg is None or cfg.qk_norm
    out = [r for r in RULES if qk_norm or ("/norm_q/" not in r.nnx and "/norm_k/" not in r.nnx)]
    return [Rule(r.torch, nnx_prefix + r.nnx, r.transform) for r in out]


def load(
    ckpt: weights.TorchCheckpoint,
    cfg: DiTConfig,
    mesh,
    rule_table: str = "fsdp",
    *,
    prefix: str = PREFIX,
    ignore=(),
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> DiT:
    """A DiT filled from ``ckpt`` (keys under ``prefix``), every tensor streamed into its sharding.

    Raises weights.CheckpointMismatchError naming every missing / unexpected / mis-shaped key.
    """
    table = sharding.rules_for(rule_table)

    def factory():
        return DiT(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=table, rngs=nnx.Rngs(0))

    graphdef, abstract = sharding.abstract_with_shardings(factory, mesh, table)
    state = weights.load_component(ckpt, rules(cfg), abstract, prefix=prefix, ignore=ignore, where="DiT head")
    return nnx.merge(graphdef, state)


def export(dit: DiT, prefix: str = PREFIX):
    """(torch key, numpy tensor) pairs in the released layout, one at a time."""
    return weights.export_component(rules(dit.cfg), nnx.state(dit, nnx.Param), prefix)
