"""SDXL-layout ``UNet2DConditionModel`` of the pixel decoder (docs/model.md 9), in Flax NNX.

The BLIP3-o ``diffusion-decoder/`` is Emu2's visual decoder: an SDXL-base UNet whose cross-attention
reads the 64 target tokens (B, 64, 1792) and whose ``text_time`` added embedding reads their mean plus
the six size/crop ids. This file ports diffusers' ``UNet2DConditionModel`` for exactly the features
that layout uses (docs/model.md 9 table): DownBlock2D / CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn,
CrossAttnUpBlock2D / UpBlock2D, Transformer2DModel with linear projections and per-block depth,
BasicTransformerBlock (self-attention, cross-attention, GEGLU), GroupNorm 32.

Layout: activations are NHWC (channels last, the natural TPU/XLA layout); attribute names mirror the
diffusers module tree (``down_blocks/1/attentions/0/transformer_blocks/attn1/to_q``) so the converter
(unet_mapping.py) derives its Rule table mechanically. The transformer blocks inside one
Transformer2DModel are stacked along a 'layers' axis and scanned (SDXL has 10 per block at the
lowest resolution). The building blocks (GroupNorm, Conv, ResnetBlock2D, Attention, up/down
sampling) are shared with the VAE (vae.py); LayerNorm and the attention op are the shared ones of
models/layers.py and models/attention.py.

Note the diffusers quirk kept here: ``attention_head_dim`` in the UNet config is the *number of heads*
(``num_attention_heads = num_attention_heads or attention_head_dim``); the head width is channels / heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip3o_jax.models import layers as nn
from blip3o_jax.models.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` config field names; defaults = Emu2 / BLIP3-o decoder (docs/model.md 9)."""

    sample_size: int = 128  # latent side (1024 px / 8)
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)
    attention_head_dim: tuple[int, ...] = (5, 10, 20)  # number of heads per block (diffusers naming)
    cross_attention_dim: int = 1792  # width of the target tokens
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 3328  # cross_attention_dim + 6 * addition_time_embed_dim
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


def check_config(cfg: UNetConfig) -> None:
    n = len(cfg.block_out_channels)
    for name in ("down_block_types", "up_block_types", "transformer_layers_per_block", "attention_head_dim"):
        if len(getattr(cfg, name)) != n:
            raise ValueError(f"UNetConfig.{name} needs {n} entries (one per block), got {getattr(cfg, name)}")
    known_down, known_up = {"DownBlock2D", "CrossAttnDownBlock2D"}, {"UpBlock2D", "CrossAttnUpBlock2D"}
    if not set(cfg.down_block_types) <= known_down or not set(cfg.up_block_types) <= known_up:
        raise ValueError(f"supported block types: {sorted(known_down | known_up)}")
    if not cfg.use_linear_projection:
        raise ValueError("only use_linear_projection=True (the SDXL layout) is implemented")
    for c, heads in zip(cfg.block_out_channels, cfg.attention_head_dim):
        if c % heads or c % cfg.norm_num_groups:
            raise ValueError(f"channels {c} must be divisible by heads {heads} and groups {cfg.norm_num_groups}")
    if cfg.projection_class_embeddings_input_dim != cfg.cross_attention_dim + 6 * cfg.addition_time_embed_dim:
        raise ValueError(
            "projection_class_embeddings_input_dim must equal cross_attention_dim + 6 * addition_time_embed_dim "
            f"(pooled tokens + six time ids), got {cfg.projection_class_embeddings_input_dim}"
        )


# ---------------------------------------------------------------------------------------------
# Building blocks shared with the VAE


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC (statistics over H, W and the channels of a group), float32 math."""

    def __init__(self, groups: int, channels: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.groups, self.eps = groups, eps
        self.scale = nn.param(rngs, nnx.initializers.ones, (channels,), ("norm",), param_dtype)
        self.bias = nn.param(rngs, nnx.initializers.zeros, (channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


OUT_CONV_NAMES = (None, None, "embed", None)


def conv(
    cin: int,
    cout: int,
    k: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    names=(None, None, "conv_in", "embed"),
    dtype,
    param_dtype,
    rngs,
):
    """nnx.Conv with torch's default init and logical names (kh, kw, in, out); kernel = torch weight (O,I,kh,kw)
    transposed (weights.py transform "conv2d"). Output convs to image/latent channels pass
    ``names=(None, None, "embed", None)``: 3 or 4 channels do not split over a mesh axis."""
    pad = k // 2 if padding is None else padding
    fan_in = cin * k * k
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nn.torch_linear_init, names),
        bias_init=nnx.with_partitioning(nn.torch_bias_init(fan_in), ("norm",)),
        rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (time_embedding_norm 'default', output_scale_factor 1): GroupNorm, SiLU, conv,
    + projected time embedding, GroupNorm, SiLU, conv, + (1x1-conv) shortcut."""

    def __init__(self, cin, cout, temb_dim: int | None, groups, eps, *, dtype, param_dtype, rngs):
        self.norm1 = GroupNorm(groups, cin, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv(cin, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.time_emb_proj = (
            nn.linear(temb_dim, cout, (None, "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if temb_dim
            else None
        )
        self.norm2 = GroupNorm(groups, cout, eps, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = conv(cout, cout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_shortcut = (
            conv(cin, cout, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if cin != cout else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """diffusers Attention with separate q/k/v projections and ``to_out.0``; softmax in float32.

    ``context_dim`` is the key/value input width (cross-attention) or None (self-attention).
    """

    def __init__(self, dim, heads, context_dim=None, *, qkv_bias: bool, dtype, param_dtype, rngs):
        self.heads = heads
        kv_in = context_dim or dim
        kw = dict(use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = nn.linear(dim, dim, ("embed", "heads"), **kw)
        self.to_k = nn.linear(kv_in, dim, ("embed", "heads"), **kw)
        self.to_v = nn.linear(kv_in, dim, ("embed", "heads"), **kw)
        self.to_out = nn.linear(dim, dim, ("heads", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        b, n, d = x.shape
        hd = d // self.heads
        q = self.to_q(x).reshape(b, n, self.heads, hd)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, hd)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, hd)
        # Backend "auto" (xla on CPU; on TPU splash for the 64x64 / 32x32 UNet levels and the VAE's 128x128 mid
        # block): UNetConfig keeps diffusers' field names only (tests hand it to diffusers), so no attention key.
        return self.to_out(dot_product_attention(q, k, v, implementation="auto").reshape(b, n, d))


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv. ``padding=1`` in the UNet; the VAE encoder uses padding 0 after a (0,1,0,1) pad."""

    def __init__(self, channels, *, padding: int = 1, dtype, param_dtype, rngs):
        self.padding = padding
        self.conv = conv(channels, channels, stride=2, padding=padding, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        if self.padding == 0:  # diffusers pads right/bottom only, then a valid conv
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period=10000.0):
    """diffusers get_timestep_embedding: (N,) -> (N, dim) sinusoids, [cos, sin] when flipped."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, cin, cout, *, dtype, param_dtype, rngs):
        self.linear_1 = nn.linear(cin, cout, (None, "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = nn.linear(cout, cout, ("embed", None), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------------------------
# Transformer2DModel (linear projections) and BasicTransformerBlock


class GEGLU(nnx.Module):
    """``ff.net.0``: one projection to 2x the hidden width, split into value and (exact-GELU) gate."""

    def __init__(self, dim, hidden, *, dtype, param_dtype, rngs):
        self.proj = nn.linear(dim, 2 * hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """``ff.net.0`` (GEGLU, 4x width) and ``ff.net.2`` (Linear); net.1 is a dropout."""

    def __init__(self, dim, *, dtype, param_dtype, rngs):
        self.geglu = GEGLU(dim, 4 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = nn.linear(4 * dim, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj_out(self.geglu(x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention to the target tokens, GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim, eps, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nn.LayerNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
        self.attn1 = Attention(dim, heads, qkv_bias=False, **kw)
        self.norm2 = nn.LayerNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
        self.attn2 = Attention(dim, heads, context_dim, qkv_bias=False, **kw)
        self.norm3 = nn.LayerNorm(dim, eps, param_dtype=param_dtype, rngs=rngs)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6, hard-coded in diffusers) -> tokens -> proj_in -> scanned blocks -> proj_out -> + x."""

    def __init__(self, channels, heads, depth, cfg: UNetConfig, *, dtype, param_dtype, remat, rngs):
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = GroupNorm(cfg.norm_num_groups, channels, 1e-6, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = nn.linear(channels, channels, (None, "embed"), rngs=rngs, **kw)
        self.transformer_blocks = nn.stack_layers(
            lambda r: BasicTransformerBlock(channels, heads, cfg.cross_attention_dim, cfg.norm_eps, rngs=r, **kw),
            depth,
            rngs,
        )
        self.proj_out = nn.linear(channels, channels, ("embed", None), rngs=rngs, **kw)

    def __call__(self, x, context):
        b, h, w, c = x.shape
        tokens = self.proj_in(self.norm(x).reshape(b, h * w, c))
        tokens = nn.scan_layers(self.transformer_blocks, tokens, context, remat=self.remat)
        return x + self.proj_out(tokens).reshape(b, h, w, c)


# ---------------------------------------------------------------------------------------------
# Down / mid / up blocks


class DownBlock(nnx.Module):
    """DownBlock2D (no attentions) or CrossAttnDownBlock2D; returns (h, skip states)."""

    def __init__(self, cfg: UNetConfig, i: int, cin: int, cross_attn: bool, *, dtype, param_dtype, remat, rngs):
        cout = cfg.block_out_channels[i]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nnx.List(
            [ResnetBlock2D(cin if j == 0 else cout, cout, temb, g, eps, **kw) for j in range(cfg.layers_per_block)]
        )
        self.attentions = (
            nnx.List(
                [
                    Transformer2DModel(
                        cout, cfg.attention_head_dim[i], cfg.transformer_layers_per_block[i], cfg, remat=remat, **kw
                    )
                    for _ in range(cfg.layers_per_block)
                ]
            )
            if cross_attn
            else None
        )
        is_final = i == len(cfg.block_out_channels) - 1
        self.downsamplers = None if is_final else nnx.List([Downsample2D(cout, padding=1, **kw)])

    def __call__(self, h, temb, context):
        skips = []
        for j, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn with one attention: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig, *, dtype, param_dtype, remat, rngs):
        c = cfg.block_out_channels[-1]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nnx.List([ResnetBlock2D(c, c, temb, g, eps, **kw) for _ in range(2)])
        heads, depth = cfg.attention_head_dim[-1], cfg.transformer_layers_per_block[-1]
        self.attentions = nnx.List([Transformer2DModel(c, heads, depth, cfg, remat=remat, **kw)])

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        h = self.attentions[0](h, context)
        return self.resnets[1](h, temb)


class UpBlock(nnx.Module):
    """UpBlock2D or CrossAttnUpBlock2D: layers_per_block + 1 resnets, each reading one concatenated skip."""

    def __init__(self, cfg: UNetConfig, i: int, cross_attn: bool, *, dtype, param_dtype, remat, rngs):
        rev = cfg.block_out_channels[::-1]
        n = len(rev)
        cout, prev = rev[i], rev[max(i - 1, 0)]
        cin = rev[min(i + 1, n - 1)]
        num_layers = cfg.layers_per_block + 1
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    (prev if j == 0 else cout) + (cin if j == num_layers - 1 else cout), cout, temb, g, eps, **kw
                )
                for j in range(num_layers)
            ]
        )
        heads, depth = cfg.attention_head_dim[::-1][i], cfg.transformer_layers_per_block[::-1][i]
        self.attentions = (
            nnx.List([Transformer2DModel(cout, heads, depth, cfg, remat=remat, **kw) for _ in range(num_layers)])
            if cross_attn
            else None
        )
        self.upsamplers = None if i == n - 1 else nnx.List([Upsample2D(cout, **kw)])

    def __call__(self, h, skips, temb, context):
        for j, resnet in enumerate(self.resnets):
            h = resnet(jnp.concatenate([h, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                h = self.attentions[j](h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


# ---------------------------------------------------------------------------------------------
# The UNet


def _build_block(make, rngs: nnx.Rngs):
    """``make(rngs)``, inside its own jit trace when the caller is tracing (nnx.eval_shape, create_sharded).

    Why: in flax 0.12 every RNG draw on a traced key costs time linear in the size of the enclosing
    trace (``Variable.__setitem__`` probes ``.sharding`` on a tracer, whose error message walks the whole
    jaxpr), so building the ~500-parameter UNet in one trace is quadratic (~20 s even tiny). One trace per
    down/mid/up block keeps it linear. Eager construction is left as it is (a jit per block would compile).
    """
    if isinstance(rngs.params.key[...], jax.core.Tracer):
        return nnx.jit(make)(rngs)
    return make(rngs)


class UNet2DConditionModel(nnx.Module):
    """ε-prediction UNet: (noisy sample NHWC, timestep, target tokens, pooled tokens, time ids) -> ε NHWC."""

    def __init__(
        self,
        cfg: UNetConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        check_config(cfg)
        self.cfg, self.dtype = cfg, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        c0 = cfg.block_out_channels[0]
        self.conv_in = conv(cfg.in_channels, c0, rngs=rngs, **kw)
        self.time_embedding = TimestepEmbedding(c0, cfg.time_embed_dim, rngs=rngs, **kw)
        self.add_embedding = TimestepEmbedding(
            cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim, rngs=rngs, **kw
        )
        block_in = (c0,) + cfg.block_out_channels[:-1]
        down, up = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
        self.down_blocks = nnx.List(
            [
                _build_block(lambda r: DownBlock(cfg, i, cin, kind == down, remat=remat, rngs=r, **kw), rngs)
                for i, (kind, cin) in enumerate(zip(cfg.down_block_types, block_in))
            ]
        )
        self.mid_block = _build_block(lambda r: MidBlock(cfg, remat=remat, rngs=r, **kw), rngs)
        self.up_blocks = nnx.List(
            [
                _build_block(lambda r: UpBlock(cfg, i, kind == up, remat=remat, rngs=r, **kw), rngs)
                for i, kind in enumerate(cfg.up_block_types)
            ]
        )
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, c0, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = conv(c0, cfg.out_channels, names=OUT_CONV_NAMES, rngs=rngs, **kw)

    def __call__(
        self,
        sample: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array,
        time_ids: jax.Array,
    ) -> jax.Array:
        """sample (B, H, W, in_channels); timestep scalar or (B,); encoder_hidden_states (B, L,
        cross_attention_dim); text_embeds (B, cross_attention_dim); time_ids (B, 6). Returns (B, H, W, out)."""
        cfg = self.cfg
        b, h, w, _ = sample.shape
        down = 2 ** (len(cfg.block_out_channels) - 1)
        if h % down or w % down:
            raise ValueError(f"sample side {(h, w)} must be a multiple of {down}")
        t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.astype(self.dtype))
        # text_time: sinusoids of the six size/crop ids, flattened, after the pooled tokens.
        ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
        add = jnp.concatenate([text_embeds.astype(jnp.float32), ids.reshape(b, -1)], axis=-1)
        emb = emb + self.add_embedding(add.astype(self.dtype))

        context = encoder_hidden_states.astype(self.dtype)
        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, context)
            skips += s
        x = self.mid_block(x, emb, context)
        for block in self.up_blocks:
            x = block(x, skips, emb, context)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
