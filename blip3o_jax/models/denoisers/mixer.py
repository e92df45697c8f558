"""An MLP-Mixer velocity network (``model.denoiser='mixer'``): the worked example of docs/ADDING_A_HEAD.md.

Not part of BLIP3-o's release (no PyTorch layout, so ``convert`` refuses to export it and loading a
released checkpoint into a mixer model skips the DiT's weights). It exists to show that a flow head
runs any registered network, and as a cheap attention-free baseline for the design-space study
(docs/model.md 12.1): no attention, so its cost is linear in the number of target tokens N.

    velocity(x (B, N, C), t (B,) on 0..1000, z (B, n_query, H)) -> (B, N, C) float32

The condition is read once, pooled: ``c = silu(time_embed(t) + linear(LayerNorm(mean_queries(z))))``.
Each block is a token-mixing MLP (across the N positions, per channel) and a channel MLP (per
position), each behind a LayerNorm modulated by c (adaLN: shift, scale, gate). The modulation
projections start at zero (adaLN-Zero, as in DiT), so every block starts as the identity and the first
forward pass is ``out_proj(LayerNorm(in_proj(x)))`` whatever t and z are. Blocks are stacked along a
'layers' axis and scanned (one compiled block, remat policy from the constructor). Norms and the GELUs
run in float32; matmuls in the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from blip3o_jax import flops as flops_lib
from blip3o_jax.models import heads
from blip3o_jax.models import layers as nn
from blip3o_jax.models.dit import MLP2, timestep_sinusoid
from blip3o_jax.sharding import constrain

TIME_FREQ_DIM = 256  # width of the sinusoidal timestep features (as the DiT's)


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Config section ``model.mixer``. Defaults: the released EVA-CLIP target (8x8 tokens of width 1792)
    conditioned by the 8B backbone (H = 3584), at a small width."""

    input_size: int = 8  # target grid side: N = input_size**2 tokens
    in_channels: int = 1792  # target feature width C
    latent_embedding_size: int = 3584  # condition width H (the LLM's hidden size)
    dim: int = 512  # model width D
    n_layers: int = 4
    token_mlp_dim: int = 128  # hidden width of the token-mixing MLP (N -> this -> N)
    channel_mlp_dim: int = 2048  # hidden width of the channel MLP (D -> this -> D)
    norm_eps: float = 1e-6

    @property
    def num_tokens(self) -> int:
        return self.input_size * self.input_size


def _check(cfg: MixerConfig) -> list[tuple[str, str]]:
    problems = [(k, f"must be > 0, got {getattr(cfg, k)}")
                for k in ("input_size", "in_channels", "latent_embedding_size", "dim", "n_layers", "token_mlp_dim",
                          "channel_mlp_dim") if getattr(cfg, k) <= 0]
    if not cfg.norm_eps > 0:
        problems.append(("norm_eps", f"must be > 0, got {cfg.norm_eps}"))
    return problems


def _forward_flops(cfg: MixerConfig, n_query: int, params: int) -> float:
    """Weight matmuls of one sample (bias adds, norms, activations and the query mean left out, as
    flops.dense_flops counts). The token MLP's weights are applied once per channel, not per token, so
    the count is built from the shapes rather than from ``params``."""
    del n_query, params  # the queries are averaged (no matmul) before the condition projection
    d, n, c, layers = cfg.dim, cfg.num_tokens, cfg.in_channels, cfg.n_layers
    per_token = c * d + layers * 2 * d * cfg.channel_mlp_dim + d * c  # in_proj, channel MLPs, out_proj
    per_channel = layers * 2 * n * cfg.token_mlp_dim  # token MLPs, one pass per channel
    per_sample = (TIME_FREQ_DIM * d + d * d + cfg.latent_embedding_size * d  # time and condition embeddings
                  + layers * d * 6 * d + d * 2 * d)  # the adaLN modulations
    return (flops_lib.dense_flops(per_token, n, "forward") + flops_lib.dense_flops(per_channel, d, "forward")
            + flops_lib.dense_flops(per_sample, 1, "forward"))


def _gelu32(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


def _zero_linear(d_in: int, d_out: int, names, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear whose kernel and bias start at zero (adaLN-Zero modulation)."""
    zeros = nnx.initializers.zeros_init()
    return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.with_partitioning(zeros, names),
                      bias_init=nnx.with_partitioning(zeros, (names[1],)))


class MixerBlock(nnx.Module):
    """adaLN-modulated token-mixing MLP, then adaLN-modulated channel MLP, both residual and gated."""

    def __init__(self, cfg: MixerConfig, *, dtype, param_dtype, rules=None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.rules = rules
        # shift/scale/gate for each of the two sub-blocks, from the pooled time + condition vector.
        self.modulation = _zero_linear(cfg.dim, 6 * cfg.dim, (None, "embed"), **kw)
        self.norm1 = nn.LayerNorm(cfg.dim, cfg.norm_eps, affine=False)
        self.norm2 = nn.LayerNorm(cfg.dim, cfg.norm_eps, affine=False)
        # The token MLP's weights act on the token axis, which no rule table shards.
        self.token_mlp = MLP2(cfg.num_tokens, cfg.token_mlp_dim, cfg.num_tokens, ((None, "mlp"), ("mlp", None)),
                              _gelu32, **kw)
        self.channel_mlp = MLP2(cfg.dim, cfg.channel_mlp_dim, cfg.dim, (("embed", "mlp"), ("mlp", "embed")),
                                _gelu32, **kw)

    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, None] for m in jnp.split(self.modulation(c), 6, axis=-1))
        u = self.norm1(h) * (1 + scale1) + shift1
        mixed = jnp.swapaxes(self.token_mlp(jnp.swapaxes(u, 1, 2)), 1, 2)  # (B, D, N) -> MLP over N -> (B, N, D)
        h = h + gate1 * mixed
        h = h + gate2 * self.channel_mlp(self.norm2(h) * (1 + scale2) + shift2)
        return constrain(h, ("batch", "length", "act_embed"), self.rules)


# No transformer stack for the planner to model (shape=None), no released PyTorch layout (mapping=None).
@heads.register_velocity_net("mixer", config=MixerConfig, forward_flops=_forward_flops, check=_check)
class Mixer(nnx.Module):
    """The MLP-Mixer velocity network (see the module docstring)."""

    def __init__(self, cfg: MixerConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str = "none", rules=None, rngs: nnx.Rngs):
        problems = _check(cfg)
        if problems:
            raise ValueError("MixerConfig: " + "; ".join(f"{k}: {p}" for k, p in problems))
        self.cfg, self.dtype, self.remat, self.rules = cfg, dtype, remat, rules
        d = cfg.dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_proj = nn.linear(cfg.in_channels, d, ("conv_in", "embed"), **kw)
        self.time_embedder = MLP2(TIME_FREQ_DIM, d, d, ((None, "embed"), ("embed", None)), jax.nn.silu, **kw)
        self.condition_norm = nn.LayerNorm(cfg.latent_embedding_size, 1e-5, param_dtype=param_dtype)
        self.condition_proj = nn.linear(cfg.latent_embedding_size, d, ("embed", None), **kw)
        self.layers = nn.stack_layers(
            lambda r: MixerBlock(cfg, dtype=dtype, param_dtype=param_dtype, rules=rules, rngs=r), cfg.n_layers, rngs)
        self.final_modulation = _zero_linear(d, 2 * d, (None, "embed"), **kw)
        self.norm_out = nn.LayerNorm(d, cfg.norm_eps, affine=False)
        self.out_proj = nn.linear(d, cfg.in_channels, ("embed", "channels"), **kw)

    def condition_vector(self, t: jax.Array, z: jax.Array) -> jax.Array:
        """(B, D): silu(time embedding + projected mean of the query states)."""
        dt = self.dtype or jnp.float32
        e_t = self.time_embedder(timestep_sinusoid(t, TIME_FREQ_DIM).astype(dt))
        pooled = jnp.mean(z.astype(jnp.float32), axis=1)  # a zero condition (CFG) pools to zero
        e_z = self.condition_proj(self.condition_norm(pooled).astype(dt))
        return jax.nn.silu((e_t + e_z).astype(jnp.float32)).astype(dt)

    def __call__(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        if n != self.cfg.num_tokens:
            raise ValueError(f"the mixer's token MLP is built for {self.cfg.num_tokens} tokens "
                             f"(input_size {self.cfg.input_size}), got {n}")
        dt = self.dtype or jnp.float32
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        x = constrain(x.astype(dt), ("batch", "length", None), self.rules)
        z = constrain(z.astype(dt), ("batch", "length", None), self.rules)
        c = self.condition_vector(t, z)
        h = nn.scan_layers(self.layers, self.in_proj(x), c, remat=self.remat)
        shift, scale = (m[:, None] for m in jnp.split(self.final_modulation(c), 2, axis=-1))
        return self.out_proj(self.norm_out(h) * (1 + scale) + shift).astype(jnp.float32)

    velocity = __call__
