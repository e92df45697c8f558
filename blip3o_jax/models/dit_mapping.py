"""PyTorch <-> NNX mapping of the DiT head (models/dit.py, docs/model.md 5.6).

Maps the released BLIP3-o keys ``model.dit.model.<name>`` (BLIP3-o's NextDiT, diffusers'
``LuminaNextDiT2DModel`` names) onto ``DiT`` parameter paths: dots become ``/``, ``weight`` becomes
``kernel`` (transposed) or ``scale``, and the per-block ``layers.{i}.*`` tensors fill one array stacked
along the leading 'layers' axis. ``caption_embedder.0`` / ``.1`` are named ``caption_norm`` /
``caption_linear`` here. Nothing else is in the released checkpoint: no ``attn1.to_out``
(self-attention shares ``attn2.to_out.0``), no ``norm_out.norm`` (no affine), no ``pad_token`` and no
``freqs_cis`` (the RoPE table is recomputed). A state dict of stock diffusers' ``LuminaNextDiT2DModel``
additionally holds the unused ``pad_token``: drop it before loading.

Rule of the table: every weight is mapped exactly once; weights.load_component checks coverage both
ways (every missing, unexpected and mis-shaped key in one error) before reading any tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.models.dit import FFN_RULES, DiT, DiTConfig, ffn_hidden_dim
from blip3o_jax.weights import Rule

PREFIX = "model.dit.model."
log = logging.getLogger(__name__)


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


def rules(cfg: DiTConfig) -> list[Rule]:
    """The table of this DiT: without the q/k-norm rules when ``cfg.qk_norm`` is False."""
    return [r for r in RULES if cfg.qk_norm or ("/norm_q/" not in r.nnx and "/norm_k/" not in r.nnx)]


def load(
    ckpt,
    cfg: DiTConfig,
    mesh,
    rule_table: str = "replicated",
    *,
    prefix: str = PREFIX,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> DiT:
    """A DiT filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one; keys under ``prefix``),
    every tensor streamed into its sharding on ``mesh`` under the rule table ``rule_table``
    (sharding.RULE_TABLES). Raises weights.CheckpointMismatchError naming every offending key."""
    table = sharding.rules_for(rule_table)
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: DiT(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=table, rngs=nnx.Rngs(0)),
        mesh, table)
    return nnx.merge(graphdef, weights.load_component(ckpt, rules(cfg), abstract, prefix=prefix, where="DiT head"))


def export(model: DiT, prefix: str = PREFIX) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, numpy tensor) pairs in the released layout, one at a time."""
    return weights.export_component(rules(model.cfg), nnx.state(model, nnx.Param), prefix)


# config.json's optional ``dit_config`` block (contract 3: the reference's NextDiTCrossAttnConfig names),
# read and written by blip3o_jax.conversion through the head registry (models/heads.py).
JSON_FIELDS = ("input_size", "patch_size", "in_channels", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of",
               "ffn_dim_multiplier", "norm_eps", "qk_norm")


FFN_KEY = PREFIX + "layers.0.feed_forward.linear_1.weight"  # (F, D): the FFN width F of every block


def config_from_hf(hf: dict, condition_width: int,
                   stored_shape: Callable[[str], tuple[int, ...] | None] | None = None) -> dict:
    """``model.dit`` values from a BLIP3-o config.json (absent block = the released sizes).

    The target width ``in_channels`` is ``dit_config.in_channels``, else the top-level
    ``gen_hidden_size`` (1792 in the released config.json); both present and different is an error.
    ``stored_shape(torch key)`` (the checkpoint's shapes, None for an absent key) lets the FFN width be
    read from the weights: see ffn_rule_from_checkpoint."""
    block = dict(hf.get("dit_config") or {})
    unknown = set(block) - set(JSON_FIELDS) - {"latent_embedding_size", "rope_theta"}
    if unknown:
        raise ValueError(f"config.json dit_config: unknown fields {sorted(unknown)}; allowed: {list(JSON_FIELDS)}")
    if block.get("ffn_dim_multiplier") is None:
        block.pop("ffn_dim_multiplier", None)  # None in the reference = no multiplier (0.0 here)
    gen_width = hf.get("gen_hidden_size")
    if gen_width is not None:
        if "in_channels" in block and int(block["in_channels"]) != int(gen_width):
            raise ValueError(f"config.json: gen_hidden_size = {gen_width} (the target feature width) but "
                             f"dit_config.in_channels = {block['in_channels']}; they name the same width, make "
                             "them agree")
        block["in_channels"] = int(gen_width)
    block["latent_embedding_size"] = condition_width  # the DiT reads the LLM states (docs/model.md 5.1)
    if stored_shape is not None:
        block.update(ffn_rule_from_checkpoint(block, stored_shape))
    return block


def ffn_rule_from_checkpoint(block: dict, stored_shape: Callable[[str], tuple[int, ...] | None]) -> dict:
    """``{'ffn_rule': ...}`` that builds the FFN width the checkpoint stores (``{}`` if the config's
    already does, or nothing is stored; a stored width D that differs is left to the coverage check).

    Weights trained with the BLIP3-o repo's copy of the block on diffusers >= 0.33 have FFN width 4D
    (7168 for D = 1792) where the released ones have the stock int(2/3 * 4D) rounding (4864,
    docs/model.md fact 6): when the stored width is the other rule's, that rule is built and a warning
    says so; any other width raises, naming both shapes and the fields that set the width."""
    found = stored_shape(FFN_KEY)
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    cfg = DiTConfig(**{k: v for k, v in block.items() if k in fields})
    if found is None or len(found) != 2 or found[1] != cfg.dim:
        return {}
    want = ffn_hidden_dim(cfg)
    if found[0] == want:
        return {}
    for rule in FFN_RULES:
        other = dataclasses.replace(cfg, ffn_rule=rule)
        if rule != cfg.ffn_rule and ffn_hidden_dim(other) == found[0]:
            what = {"4d": "4D, the BLIP3-o repo's DiT block on diffusers >= 0.33",
                    "stock": "int(2/3 * 4D), the stock diffusers rule of the released weights"}[rule]
            log.warning("%s is %s: the DiT FFN width %d is the %r rule (%s), not the configured %d; "
                            "building it with model.dit.ffn_rule = %r", FFN_KEY, tuple(found), found[0], rule,
                            what, want, rule)
            return {"ffn_rule": rule}
    raise ValueError(
        f"checkpoint {FFN_KEY} has shape {tuple(found)}, the DiT config expects ({want}, {cfg.dim}) (FFN width = "
        f"multiple_of {cfg.multiple_of} * ceil({'int(2/3 * 4 * dim)' if cfg.ffn_rule == 'stock' else '4 * dim'}"
        f"{' * ffn_dim_multiplier' if cfg.ffn_dim_multiplier else ''} / multiple_of)), and neither FFN rule "
        f"(model.dit.ffn_rule {list(FFN_RULES)}) gives {found[0]}: set dit_config.multiple_of / "
        "dit_config.ffn_dim_multiplier in config.json to the sizes the weights were trained with")


def config_to_hf(cfg: DiTConfig) -> dict:
    """config.json entries for the DiT: a ``dit_config`` block only when the sizes differ from the released."""
    block = {k: getattr(cfg, k) for k in JSON_FIELDS}
    if block == {k: getattr(DiTConfig(), k) for k in JSON_FIELDS}:
        return {}
    block["ffn_dim_multiplier"] = block["ffn_dim_multiplier"] or None
    return {"dit_config": block}
