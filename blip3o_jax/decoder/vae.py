"""SDXL-layout ``AutoencoderKL`` (encoder and decoder) of the pixel decoder (docs/model.md 9), in Flax NNX.

Ports diffusers' ``AutoencoderKL`` with its default ``Encoder``/``Decoder``: DownEncoderBlock2D /
UpDecoderBlock2D of ResnetBlock2D (no time embedding, eps 1e-6), a mid block resnet-attention-resnet
(single-head attention over all pixels, with bias), ``quant_conv``/``post_quant_conv`` 1x1 convs.
Images are NHWC in [-1, 1]; latents NHWC with ``latent_channels`` channels. ``encode`` returns the
posterior mean and log-variance; the pipeline decodes ``latents / scaling_factor``.
Attribute names mirror diffusers so vae_mapping.py derives the Rule table mechanically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip3o_jax.decoder.unet import OUT_CONV_NAMES, Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D, conv


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config field names; defaults = the SDXL VAE (docs/model.md 9)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.13025
    mid_block_add_attention: bool = True
    # Kept from the diffusers config, not acted on: diffusers' SDXL pipelines upcast a float16 VAE to float32
    # when it is set, but the released pipeline (pipeline_llava_gen, Emu2's) ignores it and decodes in the
    # VAE's own dtype, bfloat16 (the bf16 variant files; inference.DTYPE_PRESETS["released"]).
    force_upcast: bool = True

    @property
    def downscale(self) -> int:
        """Pixels per latent along one side (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


_EPS = 1e-6  # diffusers' Encoder/Decoder norms and resnets


class VAEAttention(nnx.Module):
    """Mid-block attention: GroupNorm -> one-head attention over the H*W pixels -> + input."""

    def __init__(self, c, groups, *, dtype, param_dtype, rngs):
        self.group_norm = GroupNorm(groups, c, _EPS, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(c, 1, qkv_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        return x + self.attn(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """UNetMidBlock2D: resnet, (attention), resnet."""

    def __init__(self, c, groups, add_attention, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock2D(c, c, None, groups, _EPS, **kw) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(c, groups, **kw)]) if add_attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 conv with (0,1,0,1) padding unless it is the last block."""

    def __init__(self, cin, cout, n, groups, downsample, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, _EPS, **kw) for j in range(n)]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, padding=0, **kw)]) if downsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
    """UpDecoderBlock2D: resnets, then nearest x2 + conv unless it is the last block."""

    def __init__(self, cin, cout, n, groups, upsample, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, _EPS, **kw) for j in range(n)]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if upsample else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], **kw)
        self.down_blocks = nnx.List(
            [
                EncoderBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, i < len(ch) - 1, **kw)
                for i, c in enumerate(ch)
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(g, ch[-1], _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, **kw)  # double_z: mean and log-variance

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, rev[0], **kw)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List(
            [
                DecoderBlock(rev[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(rev) - 1, **kw)
                for i, c in enumerate(rev)
            ]
        )
        self.conv_norm_out = GroupNorm(g, rev[-1], _EPS, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(rev[-1], cfg.out_channels, names=OUT_CONV_NAMES, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    def __init__(
        self,
        cfg: VAEConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",  # accepted for the common constructor signature; nothing is scanned here
        rngs: nnx.Rngs,
    ):
        del remat
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        c = 2 * cfg.latent_channels
        self.quant_conv = conv(c, c, 1, names=OUT_CONV_NAMES, **kw)
        self.post_quant_conv = conv(cfg.latent_channels, cfg.latent_channels, 1, names=(None,) * 4, **kw)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images (B, H, W, 3) in [-1, 1] -> posterior (mean, logvar), each (B, H/8, W/8, latent_channels)."""
        moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents (B, h, w, latent_channels), unscaled -> images (B, 8h, 8w, 3), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype)))

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(images)[0])
