"""EVA-CLIP vision transformer, the BLIP3-o generation target (docs/model.md 8.1).

BLIP3-o's DiT learns to generate the output of EVA-CLIP-E/14-plus at 448 px: the last block's tokens
with the CLS token dropped and *no* final LayerNorm, average-pooled 4x4 over the 32x32 token grid to
8x8 = 64 tokens of width 1792 (``early_pool2d_4``). This file builds that encoder at any size from
``EvaConfig`` and exposes ``target_features(images)`` (contract.md section 2).

Architecture (identical to EVA-CLIP's ``EVAVisionTransformer`` with the flags BLIP3-o uses, and to
timm's ``Eva(use_post_norm=True)`` up to timm's split q/v biases, docs/model.md 8.2):
  conv patch embedding -> prepend CLS -> + learned absolute position embedding ->
  ``layers`` post-norm blocks: x = x + LN1(Attn(x)); x = x + LN2(MLP(x))   (LayerNorm eps 1e-6)
  with one fused, biased qkv projection (q | k | v blocks, heads contiguous inside each) and an
  exact (erf) GELU MLP.

Parameter names mirror the PyTorch module (``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ...), so
``eva_mapping.py`` is a one-to-one table. Blocks are stacked along a 'layers' axis and scanned.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from blip3o_jax.models import attention
from blip3o_jax.models import layers as nn
from blip3o_jax.models.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class EvaConfig:
    """EVA-CLIP json field names; defaults = EVA-CLIP-E/14-plus at 448 px as used by BLIP3-o."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    head_width: int = 112
    mlp_ratio: float = 8.571428571428571
    postnorm: bool = True
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    pooling: str = "early_pool2d_4"  # 4x4 average pooling of the token grid -> 8x8 = 64 tokens
    attention: str = ""  # backend (models/attention.py); "" = model.attention

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        # int() as in EVA-CLIP and timm: 1792 * 8.571428571428571 == 15360.0 exactly.
        return int(self.width * self.mlp_ratio)

    @property
    def pool_size(self) -> int:
        return parse_pooling(self.pooling)


def parse_pooling(pooling: str) -> int:
    """'early_pool2d_K' -> K (the only pooling BLIP3-o's EVA target uses)."""
    prefix = "early_pool2d_"
    if not pooling.startswith(prefix) or not pooling[len(prefix):].isdigit() or int(pooling[len(prefix):]) < 1:
        raise ValueError(f"unknown EVA pooling {pooling!r}; allowed: 'early_pool2d_K' with K >= 1")
    return int(pooling[len(prefix):])


def avg_pool_tokens(tokens: jax.Array, k: int) -> jax.Array:
    """(B, g*g, C) row-major token grid -> (B, (g/k)^2, C): k x k average pooling, stride k, row-major.

    Same as reshaping to (B, C, g, g), ``F.avg_pool2d(k, k)`` and flattening back (docs/model.md 8.1).
    """
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n or g % k:
        raise ValueError(f"cannot pool {n} tokens ({g}x{g} grid?) with a {k}x{k} window")
    grid = tokens.reshape(b, g // k, k, g // k, k, c)
    return grid.mean(axis=(2, 4)).reshape(b, (g // k) ** 2, c)


class EvaAttention(nnx.Module):
    """Multi-head self-attention with one fused qkv Linear (torch ``attn.qkv``) and ``attn.proj``."""

    def __init__(self, cfg: EvaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = nn.linear(cfg.width, 3 * cfg.width, ("embed", "heads"), use_bias=cfg.qkv_bias, **kw)
        self.proj = nn.linear(cfg.width, cfg.width, ("heads", "embed"), **kw)
        self.attention = attention.check_implementation(cfg.attention, "model.eva.attention")

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        # Output columns are [q | k | v], each holding the heads contiguously (docs/model.md 8.1).
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.attention)
        return self.proj(out.reshape(b, n, self.num_heads * self.head_dim))


class EvaMlp(nnx.Module):
    def __init__(self, cfg: EvaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = nn.linear(cfg.width, cfg.mlp_dim, ("embed", "mlp"), **kw)
        self.fc2 = nn.linear(cfg.mlp_dim, cfg.width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class EvaBlock(nnx.Module):
    """Post-norm block (BLIP3-o's EVA): the LayerNorm sits on the branch output, not its input.

    ``postnorm=False`` gives the usual pre-norm block (x = x + Attn(LN1(x))) for other EVA variants.
    """

    def __init__(self, cfg: EvaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.postnorm = cfg.postnorm
        self.norm1 = nn.LayerNorm(cfg.width, cfg.layer_norm_eps, fast_variance=True, param_dtype=param_dtype,
                                  rngs=rngs)
        self.attn = EvaAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = nn.LayerNorm(cfg.width, cfg.layer_norm_eps, fast_variance=True, param_dtype=param_dtype,
                                  rngs=rngs)
        self.mlp = EvaMlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.postnorm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EvaPatchEmbed(nnx.Module):
    """Conv2d(3 -> width, kernel = stride = patch) over NHWC images (torch ``patch_embed.proj``)."""

    def __init__(self, cfg: EvaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nnx.Conv(
            3,
            cfg.width,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(nn.torch_linear_init, (None, None, "conv_in", "embed")),
            bias_init=nnx.with_partitioning(nn.torch_bias_init(3 * p * p), ("embed",)),
            rngs=rngs,
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.proj(images)  # (B, g, g, width)
        b, gh, gw, c = x.shape
        return x.reshape(b, gh * gw, c)  # row-major, as torch's flatten(2).transpose(1, 2)


class EvaVisionTransformer(nnx.Module):
    """EVA-CLIP vision tower (torch ``EVAVisionTransformer``) without final norm and head.

    ``features(images)``: last block output with CLS dropped, (B, g*g, width).
    ``target_features(images)``: the BLIP3-o target, ``features`` pooled by ``cfg.pooling``, float32.
    """

    def __init__(
        self,
        cfg: EvaConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if cfg.width % cfg.head_width or cfg.image_size % cfg.patch_size:
            raise ValueError(f"EvaConfig: head_width must divide width and patch_size image_size: {cfg}")
        if cfg.grid_size % cfg.pool_size:
            raise ValueError(f"EvaConfig.pooling {cfg.pooling!r} does not tile the {cfg.grid_size}^2 token grid")
        nn.remat_policy(remat)  # fail early on an unknown policy name
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.truncated_normal(0.02)
        self.patch_embed = EvaPatchEmbed(cfg, rngs=rngs, **kw)
        self.cls_token = nn.param(rngs, init, (1, 1, cfg.width), (None, None, "embed"), param_dtype)
        self.pos_embed = nn.param(rngs, init, (1, cfg.grid_size**2 + 1, cfg.width), (None, None, "embed"), param_dtype)
        self.blocks = nn.stack_layers(lambda r: EvaBlock(cfg, rngs=r, **kw), cfg.layers, rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """images (B, S, S, 3), normalized, S = cfg.image_size -> (B, (S/p)^2, width) in ``dtype``."""
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"EVA expects images of shape (B, {s}, {s}, 3), got {images.shape}")
        x = self.patch_embed(images.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(self.dtype)
        x = nn.scan_layers(self.blocks, x, remat=self.remat)
        return x[:, 1:]  # drop CLS; no final norm (docs/model.md 8.1)

    def target_features(self, images: jax.Array) -> jax.Array:
        """contract.md ``target_features``: (B, S, S, 3) normalized images -> (B, N, width) float32."""
        # float32 out: the flow-matching arithmetic downstream (x_sigma, targets) stays full precision.
        return avg_pool_tokens(self.features(images).astype(jnp.float32), self.cfg.pool_size)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.target_features(images)
