"""NextDiT cross-attention flow head of BLIP3-o (docs/model.md 5).

The head predicts the flow-matching velocity (noise - x0) of a grid of target tokens (EVA-CLIP
features by default, VAE latents in the design-space variant) from noisy tokens, a timestep on the
0..1000 scale and the LLM's query states. It is diffusers' ``LuminaNextDiT2DModel`` with BLIP3-o's
two changes (docs/model.md 5.5): a caption-projection MLP in front (C -> D -> D, so every block's
cross-attention and the caption pooling run at width D) and no ``pad_token``.

Per block (docs/model.md 5.3): adaLN scale/gate modulation from the time+caption embedding, sandwich
RMSNorms, q/k LayerNorm across all heads, 2-D Lumina RoPE on the self-attention q/k and the
cross-attention q, per-head tanh-gated cross-attention summed with self-attention before ONE shared
output projection (``attn2.to_out.0``), SwiGLU feed-forward. Blocks are stacked along a 'layers'
axis and run with ``nn.scan_layers`` (one compiled block, remat policy from the constructor).

Parameter names mirror the PyTorch module (see dit_mapping.py); the RoPE table is recomputed from the
grid, never stored. Norms, softmax, RoPE and the SiLU of the FFN run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax.models import attention
from blip3o_jax.models import layers as nn
from blip3o_jax.models.attention import dot_product_attention
from blip3o_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Field names of the reference's NextDiTCrossAttnConfig; defaults = the released 8B head."""

    input_size: int = 8  # grid side: N = input_size**2 target tokens (8x8 = 64 EVA tokens)
    patch_size: int = 1
    in_channels: int = 1792  # target feature width (EVA-CLIP-E) or VAE latent channels
    dim: int = 1792
    n_layers: int = 24
    n_heads: int = 28
    n_kv_heads: int = 28
    multiple_of: int = 256
    ffn_dim_multiplier: float = 0.0  # 0 = None in the reference (no extra multiplier)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    latent_embedding_size: int = 3584  # width C of the condition z (LLM hidden size)
    rope_theta: float = 10000.0
    # FFN width before ffn_dim_multiplier / multiple_of (ffn_hidden_dim): "stock" = int(2/3 * 4D), diffusers'
    # LuminaNextDiT2DModel in every version and the released weights (4864 for D = 1792); "4d" = 4D, what
    # the BLIP3-o repo's copy of the block builds on diffusers >= 0.33 (7168), for weights trained that way.
    ffn_rule: str = "stock"
    attention: str = ""  # backend (models/attention.py); "" = model.attention

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def temb_dim(self) -> int:
        """Width T of the time/caption conditioning vector (min(D, 1024), docs/model.md 5.1)."""
        return min(self.dim, 1024)

    @property
    def num_tokens(self) -> int:
        """Target tokens N of the default square grid (before patchify)."""
        return self.input_size * self.input_size


FFN_RULES = ("stock", "4d")


def ffn_hidden_dim(cfg: DiTConfig) -> int:
    """SwiGLU width: int(2/3 * 4D) (``ffn_rule`` "stock") or 4D ("4d"), times ffn_dim_multiplier if set,
    rounded up to multiple_of.

    "stock" is the diffusers rule (4864 for D = 1792), which the released checkpoint uses
    (docs/model.md fact 6); "4d" is the repo copy of the block on diffusers >= 0.33, whose
    LuminaFeedForward no longer applies the 2/3 to the 4D it is passed (7168 for D = 1792).
    """
    if cfg.ffn_rule not in FFN_RULES:
        raise ValueError(f"DiT ffn_rule {cfg.ffn_rule!r}: one of {FFN_RULES}")
    hidden = int(4 * 2 * cfg.dim / 3) if cfg.ffn_rule == "stock" else 4 * cfg.dim
    if cfg.ffn_dim_multiplier:
        hidden = int(cfg.ffn_dim_multiplier * hidden)
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)


def _check(cfg: DiTConfig) -> None:
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"DiT dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"DiT n_kv_heads {cfg.n_kv_heads} must divide n_heads {cfg.n_heads}")
    if cfg.head_dim % 4:
        raise ValueError(f"DiT head_dim {cfg.head_dim} must be divisible by 4 for the 2-D RoPE")


# ---------------------------------------------------------------------------------------------
# Small layers


class MLP2(nnx.Module):
    """linear_1 -> activation -> linear_2 (diffusers PixArtAlphaTextProjection / TimestepEmbedding)."""

    def __init__(self, d_in, d_hidden, d_out, names, act, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.act = act
        self.linear_1 = nn.linear(d_in, d_hidden, names[0], rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_2 = nn.linear(d_hidden, d_out, names[1], rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# ---------------------------------------------------------------------------------------------
# Positional and timestep encodings (recomputed, never parameters)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Lumina 2-D RoPE (docs/model.md 5.4) for a row-major grid: cos, sin of shape (grid_h*grid_w, head_dim/2).

    Complex pair k of a head is (x[2k], x[2k+1]); pair 2j turns by row*theta_j, pair 2j+1 by
    col*theta_j, theta_j = theta**(-j / (head_dim/4)). Float32 like diffusers' table.
    """
    half = head_dim // 2
    freqs = (1.0 / theta ** (np.arange(0, half, 2, dtype=np.float32) / half)).astype(np.float32)  # (hd/4,)
    rows = np.arange(grid_h, dtype=np.float32)[:, None, None] * freqs  # (H, 1, hd/4)
    cols = np.arange(grid_w, dtype=np.float32)[None, :, None] * freqs  # (1, W, hd/4)
    rows, cols = np.broadcast_to(rows, (grid_h, grid_w, half // 2)), np.broadcast_to(cols, (grid_h, grid_w, half // 2))
    angles = np.stack([rows, cols], axis=-1).reshape(grid_h * grid_w, half)  # interleave row/col pairs
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs of x (B, L, heads, hd) by the (L, hd/2) angles; float32 inside."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = x32[..., 0], x32[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """[cos(t f_i), sin(t f_i)] with f_i = exp(-ln(max_period) i / (dim/2)): cosine half first."""
    half = dim // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)) / half
    angles = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def patchify(x: jax.Array, grid: tuple[int, int], p: int) -> jax.Array:
    """(B, H*W, C) row-major tokens -> (B, H/p * W/p, C*p*p), features ordered (C, ph, pw) like diffusers."""
    b, _, c = x.shape
    h, w = grid
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: jax.Array, grid: tuple[int, int], p: int) -> jax.Array:
    """(B, H/p * W/p, p*p*C), features ordered (ph, pw, C) like diffusers' output -> (B, H*W, C)."""
    b, _, f = x.shape
    h, w = grid
    c = f // (p * p)
    x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


# ---------------------------------------------------------------------------------------------
# Attention


class Attention(nnx.Module):
    """diffusers Attention + LuminaAttnProcessor2_0: returns per-head outputs (no output projection)."""

    def __init__(self, cfg: DiTConfig, *, with_out: bool, dtype, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.dim, cfg.head_dim
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.to_q = nn.linear(d, cfg.n_heads * hd, ("embed", "heads"), **kw)
        self.to_k = nn.linear(d, cfg.n_kv_heads * hd, ("embed", "kv"), **kw)
        self.to_v = nn.linear(d, cfg.n_kv_heads * hd, ("embed", "kv"), **kw)
        if cfg.qk_norm:  # LayerNorm across all heads (the full projected vector), eps 1e-5
            self.norm_q = nn.LayerNorm(cfg.n_heads * hd, 1e-5, param_dtype=param_dtype)
            self.norm_k = nn.LayerNorm(cfg.n_kv_heads * hd, 1e-5, param_dtype=param_dtype)
        else:
            self.norm_q = self.norm_k = None
        # attn2.to_out.0 is the block's single output projection, shared with self-attention.
        self.to_out = nn.linear(cfg.n_heads * hd, d, ("heads", "embed"), **kw) if with_out else None
        self.attention = attention.check_implementation(cfg.attention, "model.dit.attention")

    def heads(self, x, ctx, rope, rope_on_keys: bool) -> jax.Array:
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        b = x.shape[0]
        q = q.reshape(b, -1, self.n_heads, self.head_dim)
        k = k.reshape(b, -1, self.n_kv_heads, self.head_dim)
        v = v.reshape(b, -1, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, *rope)
        if rope_on_keys:
            k = apply_rope(k, *rope)
        # All-ones caption mask (docs/model.md 5.3).
        return dot_product_attention(q, k, v, implementation=self.attention)


class FeedForward(nnx.Module):
    """LuminaFeedForward: linear_2(silu_fp32(linear_1 y) * linear_3 y), no biases."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        f = ffn_hidden_dim(cfg)
        kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = nn.linear(cfg.dim, f, ("embed", "mlp"), **kw)
        self.linear_2 = nn.linear(f, cfg.dim, ("mlp", "embed"), **kw)
        self.linear_3 = nn.linear(cfg.dim, f, ("embed", "mlp"), **kw)

    def __call__(self, y):
        a = self.linear_1(y)
        gate = jax.nn.silu(a.astype(jnp.float32)).astype(a.dtype)
        return self.linear_2(gate * self.linear_3(y))


class RMSNormZero(nnx.Module):
    """LuminaRMSNormZero: adaLN modulation (scale-attn, gate-attn, scale-mlp, gate-mlp) + RMSNorm."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear = nn.linear(
            cfg.temb_dim, 4 * cfg.dim, (None, "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        self.norm = nn.RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=param_dtype)

    def __call__(self, x, temb):
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(self.linear(jax.nn.silu(temb)), 4, axis=-1)
        return self.norm(x) * (1 + scale_msa[:, None]), gate_msa, scale_mlp, gate_mlp


class Block(nnx.Module):
    """LuminaNextDiTBlock (docs/model.md 5.3) with cross-attention width D."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rules=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(param_dtype=param_dtype)
        self.rules = rules
        # Per-head cross-attention gate, zero-initialised: cross-attention starts switched off (5.7).
        self.gate = nnx.Param(jnp.zeros((cfg.n_heads,), param_dtype), out_sharding=(None,))
        self.attn1 = Attention(cfg, with_out=False, **kw)
        self.attn2 = Attention(cfg, with_out=True, **kw)
        self.feed_forward = FeedForward(cfg, **kw)
        self.norm1 = RMSNormZero(cfg, **kw)
        self.ffn_norm1 = nn.RMSNorm(cfg.dim, cfg.norm_eps, **nkw)
        self.norm2 = nn.RMSNorm(cfg.dim, cfg.norm_eps, **nkw)
        self.ffn_norm2 = nn.RMSNorm(cfg.dim, cfg.norm_eps, **nkw)
        self.norm1_context = nn.RMSNorm(cfg.dim, cfg.norm_eps, **nkw)

    def __call__(self, x, c, temb, cos, sin):
        rope = (cos, sin)
        u, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
        sa = self.attn1.heads(u, u, rope, rope_on_keys=True)
        ca = self.attn2.heads(u, self.norm1_context(c), rope, rope_on_keys=False)
        ca = ca * jnp.tanh(self.gate[...].astype(jnp.float32)).astype(ca.dtype)[:, None]
        mixed = (sa + ca).reshape(*x.shape[:2], -1)
        mixed = constrain(mixed, ("batch", "length", "act_heads"), self.rules)
        h = self.attn2.to_out(mixed)
        x = x + jnp.tanh(gate_msa)[:, None] * self.norm2(h)
        f = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        x = x + jnp.tanh(gate_mlp)[:, None] * self.ffn_norm2(f)
        return constrain(x, ("batch", "length", "act_embed"), self.rules)


# ---------------------------------------------------------------------------------------------
# The head


class TimeCaptionEmbed(nnx.Module):
    """LuminaCombinedTimestepCaptionEmbedding at caption width D: e_t + Linear(LayerNorm(mean_tokens(c)))."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        t = cfg.temb_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.timestep_embedder = MLP2(256, t, t, ((None, "embed"), ("embed", None)), jax.nn.silu, **kw)
        self.caption_norm = nn.LayerNorm(cfg.dim, 1e-5, param_dtype=param_dtype)  # caption_embedder.0
        self.caption_linear = nn.linear(cfg.dim, t, ("embed", None), **kw)  # caption_embedder.1
        self.dtype = dtype

    def __call__(self, t, c):
        e_t = self.timestep_embedder(timestep_sinusoid(t).astype(self.dtype or jnp.float32))
        pooled = jnp.mean(c.astype(jnp.float32), axis=1).astype(c.dtype)  # all-ones caption mask
        return e_t + self.caption_linear(self.caption_norm(pooled))


class FinalLayer(nnx.Module):
    """LuminaLayerNormContinuous: Linear(LayerNorm_noaffine(h) * (1 + linear_1(silu(temb)))), no shift."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        out = cfg.patch_size * cfg.patch_size * cfg.in_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = nn.linear(cfg.temb_dim, cfg.dim, (None, "embed"), **kw)
        self.norm = nn.LayerNorm(cfg.dim, 1e-6, affine=False)
        self.linear_2 = nn.linear(cfg.dim, out, ("embed", "channels"), **kw)

    def __call__(self, h, temb):
        scale = self.linear_1(jax.nn.silu(temb))
        return self.linear_2(self.norm(h) * (1 + scale[:, None]))


class PatchEmbed(nnx.Module):
    """LuminaPatchEmbed: a Linear over each flattened p x p patch (features ordered channel, row, col)."""

    def __init__(self, cfg: DiTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.proj = nn.linear(p * p * cfg.in_channels, cfg.dim, ("conv_in", "embed"),
                              rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class DiT(nnx.Module):
    """BLIP3-o's NextDiT cross-attention head. ``velocity(x, t, z)`` is the contract's DiT call."""

    def __init__(
        self,
        cfg: DiTConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        rules=None,
        rngs: nnx.Rngs,
    ):
        _check(cfg)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.rules = rules  # logical-axis rule table for activation constraints (None: no constraints)
        d = cfg.dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.caption_projection = MLP2(
            cfg.latent_embedding_size, d, d, (("embed", "mlp"), ("mlp", "embed")), _gelu_tanh, **kw
        )
        self.patch_embedder = PatchEmbed(cfg, **kw)
        self.time_caption_embed = TimeCaptionEmbed(cfg, **kw)
        self.layers = nn.stack_layers(lambda r: Block(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules, rngs=r),
                                      cfg.n_layers, rngs)
        self.norm_out = FinalLayer(cfg, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, z: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
        """x (B, N, C) noisy tokens (row-major grid), t (B,) in [0, 1000] (1000 = pure noise),
        z (B, n_query, latent_embedding_size) -> velocity (B, N, C) in float32.

        ``grid`` = (rows, cols) of the token grid; default: square, side sqrt(N).
        """
        cfg, p = self.cfg, self.cfg.patch_size
        b, n, _ = x.shape
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"{n} tokens are not a square grid; pass grid=(rows, cols)")
            grid = (side, side)
        if grid[0] * grid[1] != n or grid[0] % p or grid[1] % p:
            raise ValueError(f"grid {grid} does not hold {n} tokens in whole {p}x{p} patches")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        dt = self.dtype or jnp.float32
        x = constrain(x.astype(dt), ("batch", "length", None), self.rules)
        z = constrain(z.astype(dt), ("batch", "length", None), self.rules)

        h = self.patch_embedder.proj(patchify(x, grid, p))
        cos, sin = (jnp.asarray(a) for a in rope_2d(grid[0] // p, grid[1] // p, cfg.head_dim, cfg.rope_theta))
        c = self.caption_projection(z)  # BLIP3-o addition: LLM width -> D before everything else
        temb = self.time_caption_embed(t, c)
        h = nn.scan_layers(self.layers, h, c, temb, cos, sin, remat=self.remat)
        out = unpatchify(self.norm_out(h, temb), grid, p)
        return out.astype(jnp.float32)

    velocity = __call__
