"""Generation heads: the paper's design-space variants (reference 12.1) behind one small interface.

A head turns the LLM's query states z (B, n_query, H) into target tokens (B, N, C) (CLIP features or
VAE latents, N = input_size**2, C = in_channels of the DiT config) and knows its own training loss:

    head.loss(x0, z, rng) -> scalar float32          x0 (B, N, C) clean targets, one PRNG key
    head.sample(z, rng_or_noise, **options) -> (B, N, C)

Registered heads (config key ``model.gen_head``):
  'flow'  CLIP + flow matching (the released BLIP3-o head): the NextDiT of dit.py trained with the
          flow-matching objective and sampled with guided Euler steps (flow.py). With a VAE-latent
          target it is the same head with another DiTConfig (in_channels = latent channels,
          input_size = latent grid, usually patch_size 2).
  'mse'   CLIP + MSE (Emu2 / MetaMorph style): the queries regress the target tokens directly through
          an MLP projection; deterministic, no noise.

Adding a head: docs/ADDING_A_HEAD.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax.models import flow
from blip3o_jax.models.flow import FlowConfig
from blip3o_jax.models.dit import MLP2, DiT, DiTConfig


@runtime_checkable
class GenHead(Protocol):
    """What the unified model and the trainer use from a generation head."""

    target_shape: tuple[int, int]  # (N, C) of one sample's target tokens

    def loss(self, x0: jax.Array, z: jax.Array, rng: jax.Array) -> jax.Array: ...

    def sample(self, z: jax.Array, rng_or_noise: jax.Array, **options: Any) -> jax.Array: ...


HEADS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: makes a head buildable by ``build_head(name, ...)`` / ``model.gen_head=name``."""

    def add(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"generation head {name!r} is already registered ({HEADS[name].__name__})")
        HEADS[name] = cls
        return cls

    return add


def build_head(
    name: str, cfg: DiTConfig, *, n_query: int = 64, flow_cfg: FlowConfig = FlowConfig(),
    dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: str = "none", rules=None,
    rngs: nnx.Rngs,
) -> GenHead:
    """The head registered under ``name``; every head takes the same constructor arguments."""
    if name not in HEADS:
        raise ValueError(f"unknown generation head {name!r}; registered: {sorted(HEADS)}")
    return HEADS[name](cfg, n_query=n_query, flow_cfg=flow_cfg, dtype=dtype, param_dtype=param_dtype,
                       remat=remat, rules=rules, rngs=rngs)


def noise_like_target(head: GenHead, rng_or_noise: jax.Array, batch: int) -> jax.Array:
    """Noise (B, N, C): the array itself if it is one, else standard normal drawn from the PRNG key."""
    x = jnp.asarray(rng_or_noise) if not isinstance(rng_or_noise, jax.Array) else rng_or_noise
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.shape == (2,))
    if is_key:
        return jax.random.normal(x, (batch, *head.target_shape), jnp.float32)
    return x


@register("flow")
class FlowHead(nnx.Module):
    """CLIP (or VAE) + flow matching: the DiT velocity head. Its parameters are those of ``self.dit``
    (converter rules: ``dit_mapping.rules(cfg, nnx_prefix="dit/")``)."""

    def __init__(self, cfg: DiTConfig, *, n_query: int = 64, flow_cfg: FlowConfig = FlowConfig(),
                 dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none", rules=None, rngs: nnx.Rngs):
        del n_query  # the DiT accepts any number of condition tokens
        self.flow_cfg = flow_cfg
        self.target_shape = (cfg.num_tokens, cfg.in_channels)
        self.dit = DiT(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=rules, rngs=rngs)

    def velocity(self, x, t, z):
        return self.dit.velocity(x, t, z)

    def loss(self, x0, z, rng):
        f = self.flow_cfg
        return flow.flow_matching_loss(self.dit, x0, z, rng, cond_dropout=f.cond_dropout,
                                       num_train_timesteps=f.num_train_timesteps, shift=f.shift)

    def sample(self, z, rng_or_noise, num_steps: int | None = None, guidance: float | None = None):
        f = self.flow_cfg
        noise = noise_like_target(self, rng_or_noise, z.shape[0])
        return flow.sample_features(
            self.dit, z, noise, num_steps or f.sample_steps, f.guidance if guidance is None else guidance,
            shift=f.shift, num_train_timesteps=f.num_train_timesteps,
        )


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation of a token sequence (half-pixel centres, edges clamped); if both
    counts are square numbers, bilinear interpolation of the square grids instead (row-major tokens)."""

    def interp_1d(m: int, n: int) -> np.ndarray:
        pos = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = pos - lo
        a = np.zeros((m, n), np.float32)
        a[np.arange(m), lo] += 1 - w
        a[np.arange(m), hi] += w
        return a

    so, si = math.isqrt(n_out), math.isqrt(n_in)
    if so * so == n_out and si * si == n_in:
        a = interp_1d(so, si)
        return np.kron(a, a).astype(np.float32)
    return interp_1d(n_out, n_in)


@register("mse")
class MSEHead(nnx.Module):
    """CLIP + MSE: ``pred = MLP(z)`` (H -> dim -> C, GELU-tanh), loss = mean((pred - x0)^2) in float32.

    Query i predicts target token i when n_query == N. Otherwise a learned token map (N, n_query),
    initialised to (bi)linear interpolation of the query grid onto the target grid, mixes the
    projected queries into the N target positions.
    """

    def __init__(self, cfg: DiTConfig, *, n_query: int = 64, flow_cfg: FlowConfig = FlowConfig(),
                 dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none", rules=None, rngs: nnx.Rngs):
        del flow_cfg, remat, rules  # nothing to scan or sample
        n = cfg.num_tokens
        self.target_shape = (n, cfg.in_channels)
        self.proj = MLP2(cfg.latent_embedding_size, cfg.dim, cfg.in_channels, (("embed", "mlp"), ("mlp", None)),
                         lambda x: jax.nn.gelu(x, approximate=True), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_map = (
            nnx.Param(jnp.asarray(interpolation_matrix(n, n_query), param_dtype), out_sharding=(None, None))
            if n_query != n else None
        )

    def predict(self, z):
        y = self.proj(z)
        if self.token_map is not None:
            y = jnp.einsum("nq,bqc->bnc", self.token_map[...].astype(y.dtype), y)
        return y.astype(jnp.float32)

    def velocity(self, x, t, z):
        raise NotImplementedError("the 'mse' head regresses the targets directly; it has no flow velocity")

    def loss(self, x0, z, rng):
        del rng  # deterministic objective
        return jnp.mean(jnp.square(self.predict(z) - x0.astype(jnp.float32)))

    def sample(self, z, rng_or_noise=None, **options):
        del rng_or_noise, options  # regression: one answer per condition
        return self.predict(z)
