"""The ``diffusion-decoder/`` folder (diffusers layout, docs/model.md 9) -> the Flax pixel decoder.

Folder layout read here::

    diffusion-decoder/
      unet/config.json, unet/diffusion_pytorch_model[.bf16].safetensors   (or sharded + .index.json)
      vae/config.json,  vae/diffusion_pytorch_model[.bf16].safetensors
      scheduler/scheduler_config.json

The weight mappings are those of the two networks, unet_mapping.py and vae_mapping.py; this file reads
the folder and the scheduler config.
"""

from __future__ import annotations

import dataclasses
import json
import os

from blip3o_jax.decoder import unet_mapping, vae_mapping
from blip3o_jax.decoder.scheduler import SchedulerConfig, check_scheduler_config
from blip3o_jax.decoder.unet import UNet2DConditionModel
from blip3o_jax.decoder.vae import AutoencoderKL


def scheduler_config_from_dict(d: dict) -> SchedulerConfig:
    if d.get("use_karras_sigmas") or d.get("use_exponential_sigmas") or d.get("use_beta_sigmas"):
        raise ValueError("Karras / exponential / beta sigmas are not supported")
    if d.get("final_sigmas_type", "zero") != "zero" or d.get("trained_betas") is not None:
        raise ValueError("only final_sigmas_type='zero' and computed betas are supported")
    fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
    cfg = SchedulerConfig(**{k: d[k] for k in fields if k in d})
    check_scheduler_config(cfg)
    return cfg


def load_decoder(
    path: str | os.PathLike, mesh, rule_table: str = "replicated", *, variant: str | None = None, **kw
) -> tuple[UNet2DConditionModel, AutoencoderKL | None, SchedulerConfig]:
    """The whole ``diffusion-decoder/`` folder: (unet, vae or None when absent, scheduler config); ``kw``
    (dtype, param_dtype, remat) go to the UNet, its dtypes to the VAE."""
    unet = unet_mapping.from_pretrained(os.path.join(path, "unet"), mesh, rule_table, variant=variant, **kw)
    vae_dir = os.path.join(path, "vae")
    vae = None
    if os.path.isdir(vae_dir):
        vae_kw = {k: v for k, v in kw.items() if k in ("dtype", "param_dtype")}
        vae = vae_mapping.from_pretrained(vae_dir, mesh, rule_table, variant=variant, **vae_kw)
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    sched = SchedulerConfig()
    if os.path.exists(sched_file):
        with open(sched_file) as f:
            sched = scheduler_config_from_dict(json.load(f))
    return unet, vae, sched
