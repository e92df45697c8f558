"""PyTorch <-> NNX mapping of the pixel decoder's VAE (decoder/vae.py, docs/model.md 9).

Maps diffusers' (0.42) ``AutoencoderKL`` keys, as in ``vae/diffusion_pytorch_model.safetensors`` (no
prefix), onto ``AutoencoderKL`` paths. vae.py mirrors the diffusers module tree, so the table is derived
from the NNX parameter paths with the UNet's diffusers naming rules (unet_mapping.derive_rules); the
mid-block attention's extra NNX ``attn`` level is the one VAE-specific rename there. Checkpoints with
pre-0.14 diffusers attention names (``query`` / ``key`` / ``value`` / ``proj_attn``) are read under the
current ones (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``). ``config_from_dict`` reads
``vae/config.json``.

Rule of the table: every weight is mapped exactly once; weights.load_component checks coverage both
ways (every missing, unexpected and mis-shaped key in one error) before streaming tensors one at a time
into their shardings.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import sharding, weights
from blip3o_jax.decoder.unet_mapping import derive_rules, diffusers_weights, read_json
from blip3o_jax.decoder.vae import AutoencoderKL, VAEConfig
from blip3o_jax.weights import Rule

# Pre-0.14 diffusers VAE attention names -> current ones.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_name(key: str) -> str:
    parts = key.rsplit(".", 2)
    if len(parts) == 3 and parts[1] in _LEGACY_ATTENTION and ".attentions." in key:
        return f"{parts[0]}.{_LEGACY_ATTENTION[parts[1]]}.{parts[2]}"
    return key


def config_from_dict(d: dict) -> VAEConfig:
    """diffusers AutoencoderKL config.json -> VAEConfig; refuses features the port lacks."""
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


def rules(cfg: VAEConfig) -> list[Rule]:
    return derive_rules(nnx.state(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))), nnx.Param))


def load(
    ckpt,
    cfg: VAEConfig,
    mesh,
    rule_table: str = "replicated",
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> AutoencoderKL:
    """An AutoencoderKL filled from ``ckpt`` (a weights.TorchCheckpoint or a view of one; current or
    pre-0.14 attention names), every tensor streamed into its sharding on ``mesh`` under the rule table
    ``rule_table`` (sharding.RULE_TABLES). Raises weights.CheckpointMismatchError naming every offending
    key."""
    graphdef, abstract = sharding.abstract_with_shardings(
        lambda: AutoencoderKL(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
        mesh, sharding.rules_for(rule_table))
    ckpt = weights.RenamedCheckpoint(ckpt, _current_name)
    # The abstract state gives the same table as rules(cfg), without tracing the model a second time.
    return nnx.merge(graphdef, weights.load_component(ckpt, derive_rules(abstract), abstract, where="VAE"))


def from_pretrained(
    path: str | os.PathLike,
    mesh,
    rule_table: str = "replicated",
    *,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> AutoencoderKL:
    """``load`` of a diffusers ``vae/`` folder (config.json + safetensors, see unet_mapping.diffusers_weights)."""
    cfg = config_from_dict(read_json(os.path.join(path, "config.json")))
    return load(diffusers_weights(path, variant), cfg, mesh, rule_table, dtype=dtype, param_dtype=param_dtype)


def export(model: AutoencoderKL) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, float32 numpy tensor) pairs in diffusers layout (current names), one at a time."""
    state = nnx.state(model, nnx.Param)
    return weights.export_component(derive_rules(state), state)
