"""PyTorch <-> NNX mapping of the pixel decoder's UNet (decoder/unet.py, docs/model.md 9), and the diffusers
naming rules it shares with the VAE (vae_mapping.py, as vae.py shares unet.py's building blocks).

Maps diffusers' (0.42) ``UNet2DConditionModel`` keys, as in ``unet/diffusion_pytorch_model.safetensors``
(no prefix), onto ``UNet2DConditionModel`` paths. unet.py mirrors the diffusers module tree, so the
table is derived from the NNX parameter paths (``derive_rules``): dots for ``/``, ``weight`` for
``kernel`` (transposed: "conv2d" for 4-D kernels, "linear" for 2-D) and ``scale``, plus the few renames
of ``_RENAMES`` (``to_out.0``, ``ff.net.0/2``, the VAE attention's extra ``attn`` level). The
transformer blocks inside one Transformer2DModel are stacked, so their keys carry ``{i}``.
``config_from_dict`` reads ``unet/config.json`` and refuses the features the port lacks.

Rule of the table: every weight is mapped exactly once; weights.load_component checks coverage both
ways (every missing, unexpected and mis-shaped key in one error) before streaming tensors one at a time
into their shardings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.decoder.unet import UNet2DConditionModel, UNetConfig
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


def diffusers_weights(path: str | os.PathLike, variant: str | None = None) -> weights.TorchCheckpoint:
    """One diffusers component folder: ``diffusion_pytorch_model[.variant].safetensors`` (or its shards),
    the full-precision file when present, else a ``bf16`` / ``fp16`` variant, unless ``variant`` says."""
    variants = [variant] if variant else [None, "bf16", "fp16"]
    return weights.TorchCheckpoint(path, stem=WEIGHTS_NAME, variants=variants)


def read_json(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def _per_block(value, n: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError("per-resnet transformer depths (nested lists) are not supported")
        return tuple(int(v) for v in value)
    return (int(value),) * n


def config_from_dict(d: dict) -> UNetConfig:
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


def rules(cfg: UNetConfig) -> list[Rule]:
    return derive_rules(nnx.state(nnx.eval_shape(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))), nnx.Param))


def load(
    ckpt,
    cfg: UNetConfig,
    mesh,
    rule_table: str = "replicated",
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> UNet2DConditionModel:
    """A UNet2DConditionModel filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one), every
    tensor streamed into its sharding on ``mesh`` under the rule table ``rule_table``
    (sharding.RULE_TABLES). Raises weights.CheckpointMismatchError naming every offending key."""
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: UNet2DConditionModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)),
        mesh, sharding.rules_for(rule_table))
    # The abstract state gives the same table as rules(cfg), without tracing the model a second time.
    return nnx.merge(graphdef, weights.load_component(ckpt, derive_rules(abstract), abstract, where="UNet"))


def from_pretrained(
    path: str | os.PathLike,
    mesh,
    rule_table: str = "replicated",
    *,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> UNet2DConditionModel:
    """``load`` of a diffusers ``unet/`` folder (config.json + safetensors, see diffusers_weights)."""
    cfg = config_from_dict(read_json(os.path.join(path, "config.json")))
    return load(diffusers_weights(path, variant), cfg, mesh, rule_table, dtype=dtype, param_dtype=param_dtype,
                remat=remat)


def export(model: UNet2DConditionModel) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, float32 numpy tensor) pairs in diffusers layout, one at a time."""
    state = nnx.state(model, nnx.Param)
    return weights.export_component(derive_rules(state), state)
