"""PyTorch <-> NNX mapping of the EVA-CLIP target encoder (models/eva_clip.py, docs/model.md 8.1 / 8.2 / 10.1).

Maps EVA-CLIP ``EVAVisionTransformer`` names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.{i}.*``) onto ``EvaVisionTransformer`` paths: dots become ``/``, ``weight`` becomes ``kernel``
(transposed; the patch Conv2d as "conv2d") or ``scale``, and ``blocks.{i}.*`` fills one array stacked
along the leading 'layers' axis. Three checkpoint layouts hold the same tensors under almost the same
names:

  released BLIP3-o  ``model.gen_vision_tower.vision_tower.model.`` + the EVA names below, fused
                    ``blocks.{i}.attn.qkv.bias`` (one bias of 3*width).
  standalone EVA    the same names without prefix (EVA-CLIP's ``EVAVisionTransformer`` state_dict,
                    e.g. BLIP3-o's ``eva_clip_vision_tower`` file converted to safetensors).
  timm ``Eva``      the same names, but the qkv bias is stored as ``attn.q_bias`` and ``attn.v_bias``
                    (timm keeps a zero, non-persistent ``k_bias``; Emu2's EVA stores the same pair).

``rules(cfg)`` is the one mechanical table (EVA name -> NNX path). The split q/v bias cannot be written as
a ``weights.Rule`` (one NNX array built from two tensors plus zeros), so ``FusedQkvBiasView`` presents
such a checkpoint as the fused layout: it serves ``attn.qkv.bias = [q_bias, 0, v_bias]``. A zero k bias
is exact for timm / Emu2 and harmless in general: a k bias adds the same constant to every logit of a
query, which softmax cancels (docs/model.md 8.2).

Rule of the table: every weight is mapped exactly once; weights.load_component checks coverage both
ways before reading any tensor. Tensors of the EVA file that the target path never uses (the final
``norm``, ``fc_norm`` and the CLIP projection ``head``: the target is taken before them) are ignored by
name; anything else missing, unexpected or mis-shaped raises ``weights.CheckpointMismatchError`` listing
every offender.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.models.eva_clip import EvaConfig, EvaVisionTransformer
from blip3o_jax.weights import Rule

RELEASED_PREFIX = "model.gen_vision_tower.vision_tower.model."

# Parts of EVA / timm checkpoints after the last block: not part of the BLIP3-o target (docs/model.md 8.1).
UNUSED_AFTER_BLOCKS = (r"norm\.", r"fc_norm\.", r"head\.")


def rules(cfg: EvaConfig) -> list[Rule]:
    """EVA / released names (without prefix) -> EvaVisionTransformer parameter paths."""
    table = [
        Rule("cls_token", "cls_token"),
        Rule("pos_embed", "pos_embed"),
        Rule("patch_embed.proj.weight", "patch_embed/proj/kernel", "conv2d"),
        Rule("patch_embed.proj.bias", "patch_embed/proj/bias"),
        Rule("blocks.{i}.norm1.weight", "blocks/norm1/scale"),
        Rule("blocks.{i}.norm1.bias", "blocks/norm1/bias"),
        Rule("blocks.{i}.attn.qkv.weight", "blocks/attn/qkv/kernel", "linear"),
        Rule("blocks.{i}.attn.proj.weight", "blocks/attn/proj/kernel", "linear"),
        Rule("blocks.{i}.attn.proj.bias", "blocks/attn/proj/bias"),
        Rule("blocks.{i}.norm2.weight", "blocks/norm2/scale"),
        Rule("blocks.{i}.norm2.bias", "blocks/norm2/bias"),
        Rule("blocks.{i}.mlp.fc1.weight", "blocks/mlp/fc1/kernel", "linear"),
        Rule("blocks.{i}.mlp.fc1.bias", "blocks/mlp/fc1/bias"),
        Rule("blocks.{i}.mlp.fc2.weight", "blocks/mlp/fc2/kernel", "linear"),
        Rule("blocks.{i}.mlp.fc2.bias", "blocks/mlp/fc2/bias"),
    ]
    if cfg.qkv_bias:
        table.append(Rule("blocks.{i}.attn.qkv.bias", "blocks/attn/qkv/bias"))
    return table


class FusedQkvBiasView:
    """Read-only checkpoint view (the ``TorchCheckpoint`` interface: keys / shape / get) that replaces
    every ``<x>attn.q_bias`` + ``<x>attn.v_bias`` pair by ``<x>attn.qkv.bias = [q_bias, 0, v_bias]``.

    A q_bias without its v_bias is left as is, so the coverage check reports it.
    """

    def __init__(self, ckpt):
        self._ckpt = ckpt
        self._fused: dict[str, tuple[str, str]] = {}
        keys = set(ckpt.keys())
        for key in keys:
            if key.endswith("attn.q_bias") and key[: -len("q_bias")] + "v_bias" in keys:
                base = key[: -len("q_bias")]
                self._fused[base + "qkv.bias"] = (key, base + "v_bias")
        hidden = {k for pair in self._fused.values() for k in pair}
        self._keys = [k for k in ckpt.keys() if k not in hidden] + list(self._fused)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._fused:
            (n,) = self._ckpt.shape(self._fused[key][0])
            return (3 * n,)
        return self._ckpt.shape(key)

    def get(self, key: str) -> np.ndarray:
        if key in self._fused:
            q_key, v_key = self._fused[key]
            q, v = self._ckpt.get(q_key), self._ckpt.get(v_key)
            return np.concatenate([q, np.zeros_like(q), v])
        return self._ckpt.get(key)


def detect_prefix(keys) -> str:
    """RELEASED_PREFIX if the checkpoint is a whole BLIP3-o model, else '' (standalone EVA or timm)."""
    return RELEASED_PREFIX if any(k.startswith(RELEASED_PREFIX) for k in keys) else ""


def load(
    ckpt,
    cfg: EvaConfig,
    mesh,
    rule_table: str = "replicated",
    *,
    prefix: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> EvaVisionTransformer:
    """An EvaVisionTransformer filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one) in any of
    the three layouts, every tensor streamed into its sharding on ``mesh`` under the rule table
    ``rule_table`` (sharding.RULE_TABLES). ``prefix=None`` detects it."""
    if prefix is None:
        prefix = detect_prefix(ckpt.keys())
    if any(k.startswith(prefix) and k.endswith("attn.q_bias") for k in ckpt.keys()):
        ckpt = FusedQkvBiasView(ckpt)
    ignore = [re.escape(prefix) + p for p in UNUSED_AFTER_BLOCKS]
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: EvaVisionTransformer(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)),
        mesh, sharding.rules_for(rule_table))
    state = weights.load_component(ckpt, rules(cfg), abstract, prefix=prefix, ignore=ignore,
                                   where=f"EVA-CLIP target encoder, prefix {prefix!r}")
    return nnx.merge(graphdef, state)


def export(model: EvaVisionTransformer, prefix: str = RELEASED_PREFIX) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, numpy tensor) pairs in the released layout (fused qkv bias), one at a time."""
    return weights.export_component(rules(model.cfg), nnx.state(model, nnx.Param), prefix)
