"""PyTorch <-> NNX mapping of Qwen2.5-VL (models/qwen2_5_vl.py, docs/model.md 10.2): the text model and,
through qwen_vision_mapping.py, its vision tower; plus the translation of its config.json.

Maps transformers' ``Qwen2_5_VLForConditionalGeneration`` names onto ``Qwen2_5_VL`` paths: dots become
``/``, ``weight`` becomes ``kernel`` (transposed), ``scale`` or ``embedding``, ``model.layers.{i}.*``
fills one array stacked along the leading 'layers' axis, and ``visual.*`` is the vision tower's table
under ``visual/``. Two key namings exist for the same tensors:

    transformers 4.51 (released BLIP3-o, and what transformers 5 ``save_pretrained`` writes)
        visual.*   model.embed_tokens.*   model.layers.{i}.*   model.norm.*   lm_head.weight
    transformers >= 4.52 / 5 in-memory names
        model.visual.*   model.language_model.{embed_tokens,layers,norm}.*   lm_head.weight

``canonical_key`` maps the second onto the first, and ``canonical_view`` presents any checkpoint
under canonical names, so one table (``rules``) serves both. config.json comes flat (4.51: text
fields at the top level, ``rope_scaling``) or nested (5: ``text_config``, ``vision_config``,
``rope_parameters``); ``configs_from_hf`` reads both, and ``from_pretrained`` loads a directory.

Rule of the table: every weight is mapped exactly once (no ``lm_head`` rule when the embeddings are
tied); weights.load_component checks coverage both ways (every missing, unexpected and mis-shaped key
in one error) before streaming tensors one at a time into their shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.models import qwen_vision_mapping
from blip3o_jax.models.qwen2_5_vl import (
    IMAGE_TOKEN_ID,
    VISION_START_TOKEN_ID,
    Qwen2_5_VL,
    QwenTextConfig,
    QwenVisionConfig,
)
from blip3o_jax.weights import Rule

# The configs of one Qwen2_5_VL, as its constructor takes them (vision None: a text-only model).
QwenConfigs = tuple[QwenTextConfig, QwenVisionConfig | None]

# ---------------------------------------------------------------------------------------------
# Key naming

_V5_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_key(key: str) -> str:
    """transformers-5 key -> released (4.51) key; released keys and non-Qwen keys are unchanged."""
    for new, old in _V5_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def canonical_view(ckpt) -> weights.RenamedCheckpoint:
    """A checkpoint seen under canonical (4.51) key names; reads stay lazy."""
    return weights.RenamedCheckpoint(ckpt, canonical_key)


# ---------------------------------------------------------------------------------------------
# Mapping table (canonical torch key -> NNX path of Qwen2_5_VL)

TEXT_RULES = (
    Rule("model.embed_tokens.weight", "model/embed_tokens/embedding"),
    Rule("model.layers.{i}.input_layernorm.weight", "model/layers/input_layernorm/scale"),
    Rule("model.layers.{i}.self_attn.q_proj.weight", "model/layers/self_attn/q_proj/kernel", "linear"),
    Rule("model.layers.{i}.self_attn.q_proj.bias", "model/layers/self_attn/q_proj/bias"),
    Rule("model.layers.{i}.self_attn.k_proj.weight", "model/layers/self_attn/k_proj/kernel", "linear"),
    Rule("model.layers.{i}.self_attn.k_proj.bias", "model/layers/self_attn/k_proj/bias"),
    Rule("model.layers.{i}.self_attn.v_proj.weight", "model/layers/self_attn/v_proj/kernel", "linear"),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "model/layers/self_attn/v_proj/bias"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "model/layers/self_attn/o_proj/kernel", "linear"),
    Rule("model.layers.{i}.post_attention_layernorm.weight", "model/layers/post_attention_layernorm/scale"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "model/layers/mlp/gate_proj/kernel", "linear"),
    Rule("model.layers.{i}.mlp.up_proj.weight", "model/layers/mlp/up_proj/kernel", "linear"),
    Rule("model.layers.{i}.mlp.down_proj.weight", "model/layers/mlp/down_proj/kernel", "linear"),
    Rule("model.norm.weight", "model/norm/scale"),
)

LM_HEAD_RULE = Rule("lm_head.weight", "lm_head/kernel", "linear")


def rules(cfg: QwenConfigs) -> list[Rule]:
    """Every parameter of ``Qwen2_5_VL(*cfg)`` mapped once: no lm_head when embeddings are tied, no
    ``visual.*`` without a vision config."""
    text_cfg, vision_cfg = cfg
    table = list(TEXT_RULES)
    if not text_cfg.tie_word_embeddings:
        table.append(LM_HEAD_RULE)
    if vision_cfg is not None:
        table += [Rule(qwen_vision_mapping.PREFIX + r.torch, "visual/" + r.nnx, r.transform)
                  for r in qwen_vision_mapping.rules(vision_cfg)]
    return table


def load(
    ckpt,
    cfg: QwenConfigs,
    mesh,
    rule_table: str = "replicated",
    *,
    image_token_id: int = IMAGE_TOKEN_ID,
    vision_start_token_id: int = VISION_START_TOKEN_ID,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> Qwen2_5_VL:
    """A ``Qwen2_5_VL(*cfg)`` filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one, either
    naming), every tensor streamed into its sharding on ``mesh`` under the rule table ``rule_table``
    (sharding.RULE_TABLES). A tied model ignores a stored ``lm_head.weight``, an untied one requires it;
    a text-only model (vision config None) ignores ``visual.*``. Raises weights.CheckpointMismatchError
    listing every offending key."""
    text_cfg, vision_cfg = cfg
    ignore = []
    if text_cfg.tie_word_embeddings:
        ignore.append(r"lm_head\.weight$")
    if vision_cfg is None:
        ignore.append(r"visual\.")
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: Qwen2_5_VL(text_cfg, vision_cfg, image_token_id=image_token_id,
                           vision_start_token_id=vision_start_token_id, dtype=dtype, param_dtype=param_dtype,
                           remat=remat, rngs=nnx.Rngs(0)),
        mesh, sharding.rules_for(rule_table))
    state = weights.load_component(canonical_view(ckpt), rules(cfg), abstract, ignore=ignore,
                                   where="Qwen2.5-VL backbone")
    return nnx.merge(graphdef, state)


def from_pretrained(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    rule_table: str = "replicated",
    *,
    with_vision: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> Qwen2_5_VL:
    """``load`` of a Hugging Face directory (config.json + safetensors, either naming); ``mesh`` defaults
    to the first device, ``with_vision=False`` loads the text model only."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    text_cfg, vision_cfg = configs_from_hf(config)
    tokens = token_ids_from_hf(config)
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return load(weights.TorchCheckpoint(path), (text_cfg, vision_cfg if with_vision else None), mesh, rule_table,
                image_token_id=tokens["image_token_id"], vision_start_token_id=tokens["vision_start_token_id"],
                dtype=dtype, param_dtype=param_dtype, remat=remat)


# ---------------------------------------------------------------------------------------------
# config.json


def _rope_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return d.get("rope_parameters") or d.get("rope_scaling") or {}


def configs_from_hf(config: Mapping[str, Any] | str | os.PathLike) -> tuple[QwenTextConfig, QwenVisionConfig | None]:
    """(QwenTextConfig, QwenVisionConfig or None) from a Qwen2.5-VL config.json (dict or path).

    Accepts the flat transformers-4.51 form (text fields at the top level, ``rope_theta`` and
    ``rope_scaling.mrope_section``) and the nested transformers-5 form (``text_config`` with
    ``rope_parameters``). Missing fields take the released model's values.
    """
    if not isinstance(config, Mapping):
        with open(config) as f:
            config = json.load(f)
    text = config.get("text_config") or config  # nested (5) or flat (4.51)
    d = _dataclass_defaults(QwenTextConfig)

    def pick(name, default):
        return text.get(name, config.get(name, default))

    rope = dict(_rope_dict(config))
    rope.update(_rope_dict(text))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported (Qwen2.5-VL uses M-RoPE)")
    if pick("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {pick('hidden_act', None)!r} is not supported (silu only)")
    if pick("use_sliding_window", False):
        raise ValueError("config.json: use_sliding_window=true is not supported")
    heads = pick("num_attention_heads", d["num_attention_heads"])
    hidden = pick("hidden_size", d["hidden_size"])
    if pick("head_dim", None) not in (None, hidden // heads):
        raise ValueError(f"config.json: head_dim {pick('head_dim', None)} != hidden_size / num_attention_heads")
    # transformers 5 forwards a pre-v5 text_config.tie_word_embeddings=true to the top level.
    tie = bool(config.get("tie_word_embeddings", False)) or bool(text.get("tie_word_embeddings", False))
    text_cfg = QwenTextConfig(
        vocab_size=pick("vocab_size", d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=pick("intermediate_size", d["intermediate_size"]),
        num_hidden_layers=pick("num_hidden_layers", d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=pick("num_key_value_heads", None) or heads,
        rms_norm_eps=float(pick("rms_norm_eps", d["rms_norm_eps"])),
        rope_theta=float(rope.get("rope_theta", pick("rope_theta", d["rope_theta"]))),
        mrope_section=tuple(int(x) for x in rope.get("mrope_section", d["mrope_section"])),
        tie_word_embeddings=tie,
    )
    vision = config.get("vision_config")
    if vision is None:
        return text_cfg, None
    v = _dataclass_defaults(QwenVisionConfig)
    vision_cfg = QwenVisionConfig(
        depth=vision.get("depth", v["depth"]),
        hidden_size=vision.get("hidden_size", v["hidden_size"]),
        num_heads=vision.get("num_heads", v["num_heads"]),
        intermediate_size=vision.get("intermediate_size", v["intermediate_size"]),
        in_channels=vision.get("in_channels", vision.get("in_chans", v["in_channels"])),
        patch_size=vision.get("patch_size", vision.get("spatial_patch_size", v["patch_size"])),
        temporal_patch_size=vision.get("temporal_patch_size", v["temporal_patch_size"]),
        spatial_merge_size=vision.get("spatial_merge_size", v["spatial_merge_size"]),
        window_size=vision.get("window_size", v["window_size"]),
        fullatt_block_indexes=tuple(vision.get("fullatt_block_indexes", v["fullatt_block_indexes"])),
        out_hidden_size=vision.get("out_hidden_size", text_cfg.hidden_size),
        rms_norm_eps=v["rms_norm_eps"],  # not in config.json; the ViT hard-codes 1e-6
    )
    if vision.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: vision hidden_act {vision.get('hidden_act')!r} is not supported (silu only)")
    return text_cfg, vision_cfg


def token_ids_from_hf(config: Mapping[str, Any]) -> dict[str, Any]:
    """Special-token ids of a Qwen2.5-VL config.json (released values when absent)."""
    text = config.get("text_config") or config
    eos = config.get("eos_token_id", text.get("eos_token_id", 151645))
    return {
        "image_token_id": config.get("image_token_id", IMAGE_TOKEN_ID),
        "video_token_id": config.get("video_token_id", 151656),
        "vision_start_token_id": config.get("vision_start_token_id", VISION_START_TOKEN_ID),
        "vision_end_token_id": config.get("vision_end_token_id", 151653),
        "eos_token_ids": tuple(eos) if isinstance(eos, (list, tuple)) else (eos,),
        "pad_token_id": config.get("pad_token_id", text.get("pad_token_id", 151643)),
    }


def _dataclass_defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


__all__ = [
    "QwenConfigs",
    "canonical_key",
    "canonical_view",
    "TEXT_RULES",
    "rules",
    "load",
    "from_pretrained",
    "configs_from_hf",
    "token_ids_from_hf",
]
