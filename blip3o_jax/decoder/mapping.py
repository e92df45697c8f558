"""Converter of the ``diffusion-decoder/`` folder (diffusers layout, reference 9) to the Flax pixel decoder.

Folder layout read here::

    diffusion-decoder/
      unet/config.json, unet/diffusion_pytorch_model[.bf16].safetensors   (or sharded + .index.json)
      vae/config.json,  vae/diffusion_pytorch_model[.bf16].safetensors
      scheduler/scheduler_config.json

The Rule tables are derived mechanically from the NNX parameter paths, because unet.py / vae.py mirror
the diffusers module tree; the few renames are listed in ``_RENAMES`` (``to_out.0``, ``ff.net.0/2``,
the VAE attention's extra ``attn`` level, NNX ``kernel``/``scale`` -> torch ``weight``). Transformer
blocks are stacked, so their keys carry ``{i}``. Loading goes through weights.load_component: both-ways
coverage check (every missing / unexpected / mis-shaped key listed) before streaming tensors one at a
time into their shardings. Old VAE checkpoints with pre-0.14 attention names (query / key / value /
proj_attn) are accepted through a key alias.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax.numpy as jnp
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.decoder.unet import UNet2DConditionModel, UNetConfig
from blip3o_jax.decoder.vae import AutoencoderKL, VAEConfig
from blip3o_jax.decoder.scheduler import SchedulerConfig, check_scheduler_config
from blip3o_jax.weights import Rule

WEIGHTS_NAME = "diffusion_pytorch_model"

# NNX path fragment -> torch key fragment (applied to the dotted path, in order).
_RENAMES = (
    (r"\.attn\.", "."),  # VAE mid-block attention: diffusers has no extra level
    (r"\.ff\.geglu\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.transformer_blocks\.", ".transformer_blocks.{i}."),
    (r"\.(kernel|scale)$", ".weight"),
)

# Pre-0.14 diffusers VAE attention names -> current ones.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def derive_rules(state: nnx.State) -> list[Rule]:
    """One Rule per NNX parameter of a UNet or VAE state (abstract is fine)."""
    rules = []
    for path, v in nnx.to_flat_state(state):
        nnx_path = "/".join(str(p) for p in path)
        key = "." + nnx_path.replace("/", ".")
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        shape = (v.get_value() if isinstance(v, nnx.Variable) else v).shape
        ndim = len(shape) - (1 if "{i}" in key else 0)
        transform = {4: "conv2d", 2: "linear"}.get(ndim, "none") if path[-1] == "kernel" else "none"
        rules.append(Rule(key[1:], nnx_path, transform))
    return rules


def unet_rules(cfg: UNetConfig) -> list[Rule]:
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)))
    return derive_rules(nnx.state(abstract, nnx.Param))


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    return derive_rules(nnx.state(abstract, nnx.Param))


# ---------------------------------------------------------------------------------------------
# config.json parsing


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _per_block(value, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError("per-resnet transformer depths (nested lists) are not supported")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def unet_config_from_dict(d: dict) -> UNetConfig:
    """diffusers UNet2DConditionModel config.json -> UNetConfig; refuses features the port lacks."""
    expected = {
        "addition_embed_type": "text_time",
        "class_embed_type": None,
        "encoder_hid_dim": None,
        "time_cond_proj_dim": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
        "act_fn": "silu",
        "center_input_sample": False,
        "dual_cross_attention": False,
        "only_cross_attention": False,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "num_attention_heads": None,
        "reverse_transformer_layers_per_block": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "time_embedding_type": "positional",
        "mid_block_scale_factor": 1,
        "attention_type": "default",
        "resnet_out_scale_factor": 1.0,
        "downsample_padding": 1,
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "encoder_hid_dim_type": None,
        "class_embeddings_concat": False,
        "cross_attention_norm": None,
        "mid_block_only_cross_attention": None,
        "dropout": 0.0,
    }
    # A falsy expectation (None / False / 0) accepts any falsy value: configs spell "off" either way.
    bad = {k: d[k] for k, want in expected.items() if k in d and d[k] != want and (want or d[k])}
    if bad:
        raise ValueError(f"unsupported UNet config values (the port implements the SDXL layout): {bad}")
    n = len(d["block_out_channels"])
    fields = {f.name for f in dataclasses.fields(UNetConfig)}
    kw: dict[str, Any] = {k: d[k] for k in fields if k in d}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        kw[k] = tuple(d[k])
    kw["transformer_layers_per_block"] = _per_block(d.get("transformer_layers_per_block", 1), n)
    kw["attention_head_dim"] = _per_block(d.get("attention_head_dim", 8), n)
    return UNetConfig(**kw)


def vae_config_from_dict(d: dict) -> VAEConfig:
    if d.get("down_block_types") and set(d["down_block_types"]) != {"DownEncoderBlock2D"}:
        raise ValueError(f"unsupported VAE down blocks {d['down_block_types']}")
    if d.get("up_block_types") and set(d["up_block_types"]) != {"UpDecoderBlock2D"}:
        raise ValueError(f"unsupported VAE up blocks {d['up_block_types']}")
    if d.get("act_fn", "silu") != "silu" or not d.get("use_quant_conv", True) or not d.get("use_post_quant_conv", True):
        raise ValueError("unsupported VAE config (needs act_fn silu, quant_conv and post_quant_conv)")
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    kw: dict[str, Any] = {k: d[k] for k in fields if k in d and d[k] is not None}
    kw["block_out_channels"] = tuple(d["block_out_channels"])
    return VAEConfig(**kw)


def scheduler_config_from_dict(d: dict) -> SchedulerConfig:
    if d.get("use_karras_sigmas") or d.get("use_exponential_sigmas") or d.get("use_beta_sigmas"):
        raise ValueError("Karras / exponential / beta sigmas are not supported")
    if d.get("final_sigmas_type", "zero") != "zero" or d.get("trained_betas") is not None:
        raise ValueError("only final_sigmas_type='zero' and computed betas are supported")
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    cfg = SchedulerConfig(**{k: d[k] for k in fields if k in d})
    check_scheduler_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Weights


def _current_vae_name(key: str) -> str:
    """Old diffusers VAE attention names (query/key/value/proj_attn) -> current ones (to_q/.../to_out.0)."""
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in _LEGACY_VAE_ATTENTION and ".attentions." in key:
        return f"{parts[0]}.{_LEGACY_VAE_ATTENTION[parts[1]]}.{parts[2]}"
    return key


def diffusers_weights(path: str | os.PathLike, variant: str | None = None) -> weights.RenamedCheckpoint:
    """One diffusers component folder: ``diffusion_pytorch_model[.variant].safetensors`` (or its shards),
    the full-precision file when present, else a ``bf16`` / ``fp16`` variant, unless ``variant`` says;
    old VAE attention names are read under the current ones."""
    variants = [variant] if variant else [None, "bf16", "fp16"]
    return weights.RenamedCheckpoint(weights.TorchCheckpoint(path, stem=WEIGHTS_NAME, variants=variants),
                                     _current_vae_name)


def _load(model_cls, cfg, ckpt, mesh, rule_table, dtype, param_dtype, remat, where):
    table = sharding.rules_for(rule_table)

    def factory():
        return model_cls(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))

    graphdef, abstract = sharding.abstract_with_shardings(factory, mesh, table)
    state = weights.load_component(ckpt, derive_rules(abstract), abstract, where=where)
    return nnx.merge(graphdef, state)


def load_unet(
    path: str | os.PathLike,
    mesh,
    rule_table: str = "replicated",
    *,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> UNet2DConditionModel:
    """``unet/`` folder (config.json + safetensors) -> UNet2DConditionModel, every tensor streamed into
    its sharding. Raises weights.CheckpointMismatchError naming every offending key."""
    cfg = unet_config_from_dict(_read_json(os.path.join(path, "config.json")))
    ckpt = diffusers_weights(path, variant)
    return _load(UNet2DConditionModel, cfg, ckpt, mesh, rule_table, dtype, param_dtype, remat, "UNet")


def load_vae(
    path: str | os.PathLike,
    mesh,
    rule_table: str = "replicated",
    *,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> AutoencoderKL:
    """``vae/`` folder -> AutoencoderKL (see load_unet)."""
    cfg = vae_config_from_dict(_read_json(os.path.join(path, "config.json")))
    ckpt = diffusers_weights(path, variant)
    return _load(AutoencoderKL, cfg, ckpt, mesh, rule_table, dtype, param_dtype, "none", "VAE")


def load_decoder(
    path: str | os.PathLike, mesh, rule_table: str = "replicated", *, variant: str | None = None, **kw
) -> tuple[UNet2DConditionModel, AutoencoderKL | None, SchedulerConfig]:
    """The whole ``diffusion-decoder/`` folder: (unet, vae or None when absent, scheduler config)."""
    unet = load_unet(os.path.join(path, "unet"), mesh, rule_table, variant=variant, **kw)
    vae_dir = os.path.join(path, "vae")
    vae = None
    if os.path.isdir(vae_dir):
        vae_kw = {k: v for k, v in kw.items() if k in ("dtype", "param_dtype")}
        vae = load_vae(vae_dir, mesh, rule_table, variant=variant, **vae_kw)
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    sched = scheduler_config_from_dict(_read_json(sched_file)) if os.path.exists(sched_file) else SchedulerConfig()
    return unet, vae, sched


def export(model: UNet2DConditionModel | AutoencoderKL):
    """(torch key, float32 numpy tensor) pairs in diffusers layout, one at a time."""
    state = nnx.state(model, nnx.Param)
    return weights.export_component(derive_rules(state), state)
