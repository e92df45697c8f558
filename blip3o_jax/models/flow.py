"""Flow matching for the generation head: the training objective (docs/model.md 6) and the guided Euler
sampler (docs/model.md 7).

Conventions (rectified flow as in diffusers' FlowMatchEulerDiscreteScheduler): sigma = 1 is pure noise,
``x_sigma = (1 - sigma) x0 + sigma noise``, the head predicts the velocity ``noise - x0`` and is fed
``t = 1000 sigma``. Training draws sigma from the 1000-entry discrete table (optionally shifted:
``s sigma / (1 + (s - 1) sigma)``) and zeroes each sample's condition with probability
``cond_dropout`` so the head also learns the unconditional velocity used by classifier-free guidance.

Which table entries are drawn, and how each sample's squared error is weighted, follow diffusers' SD3
training utilities (``compute_density_for_timestep_sampling`` / ``compute_loss_weighting_for_sd3``, as
its train_dreambooth_sd3.py uses them): u in [0, 1) picks entry ``floor(1000 u)`` of the descending table,
with ``timestep_sampling`` 'uniform' (u ~ U[0, 1): the reference's draw, the default),
'logit_normal' (u = sigmoid(N(logit_mean, logit_std))) or 'mode' (u = 1 - v - mode_scale (cos^2(pi v / 2)
- 1 + v), v ~ U[0, 1)); ``loss_weighting`` 'none' (the reference's plain mean, the default), 'sigma_sqrt'
(w = sigma^-2, diffusers' name) or 'cosmap' (w = 2 / (pi (1 - 2 sigma + 2 sigma^2))), the loss then
being the mean of w * (error)^2.

Sampling runs ``num_steps`` Euler steps over ``linspace(1, 1/num_steps, num_steps)`` (then 0), feeding
the head the integer-truncated timesteps (1000, 966, 933, ...) exactly like the reference, with the
conditional and unconditional (zero condition) passes batched together. The whole loop is one
compiled ``lax.fori_loop``; the schedule and guidance scale are traced arguments, so changing them
does not recompile (changing the step count or shapes does). ``shift`` / ``num_train_timesteps`` come from
FlowConfig (config section ``flow``; at inference a checkpoint's DiT ``scheduler/scheduler_config.json``
overrides them, checkpoints.read_dit_scheduler); ``sampling_schedule`` then equals diffusers'
``FlowMatchEulerDiscreteScheduler(shift=s).set_timesteps(sigmas=linspace(1, 1/n, n))``.

A "head" here is anything with ``velocity(x, t, z) -> (B, N, C)`` (the DiT, or a module wrapping it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Field names of the config section ``flow``; defaults = the reference's."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    cond_dropout: float = 0.1  # per-sample probability of a zero condition during training (CFG)
    sample_steps: int = 30
    guidance: float = 3.0
    timestep_sampling: str = "uniform"  # uniform | logit_normal | mode (TIMESTEP_SAMPLING)
    logit_mean: float = 0.0  # logit_normal: mean and std of the normal before the sigmoid
    logit_std: float = 1.0
    mode_scale: float = 1.29  # mode: its scale s (diffusers' default; SD3 paper eq. 20)
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap (LOSS_WEIGHTING)

    @classmethod
    def from_config(cls, section) -> "FlowConfig":
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


def _shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    # Python-float arithmetic on a float32 array stays float32, like the PyTorch scheduler.
    return (shift * sigmas / (1 + (shift - 1) * sigmas)).astype(np.float32)


def train_schedule(num_train_timesteps: int = 1000, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The training table (sigmas, timesteps), float32, descending: sigma = (1000, 999, ..., 1)/1000, shifted."""
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    sigmas = _shift(t / np.float32(num_train_timesteps), shift)
    return sigmas, (sigmas * np.float32(num_train_timesteps)).astype(np.float32)


def sampling_schedule(
    num_steps: int = 30, shift: float = 1.0, num_train_timesteps: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (num_steps + 1,) float32 ending in 0, timesteps (num_steps,) int32 fed to the head).

    Default = docs/model.md 7: sigmas linspace(1, 1/30, 30) + [0], timesteps int(1000 sigma) =
    1000, 966, 933, 900, ..., 33 (float32 product truncated toward zero, as torch's int64 cast).
    """
    sigmas = _shift(np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32), shift)
    timesteps = (sigmas * np.float32(num_train_timesteps)).astype(np.int64).astype(np.int32)
    return np.append(sigmas, np.float32(0.0)).astype(np.float32), timesteps


# ---------------------------------------------------------------------------------------------
# Training objective


TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def timestep_density(key: jax.Array, batch: int, scheme: str = "uniform", *, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29) -> jax.Array:
    """u (B,) in [0, 1]: diffusers' compute_density_for_timestep_sampling for ``scheme``."""
    if scheme == "uniform":
        return jax.random.uniform(key, (batch,))
    if scheme == "logit_normal":
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,)))
    if scheme == "mode":
        v = jax.random.uniform(key, (batch,))
        return 1 - v - mode_scale * (jnp.cos(jnp.pi * v / 2) ** 2 - 1 + v)
    raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {scheme!r}")


def loss_weights(sigma: jax.Array, scheme: str = "none") -> jax.Array:
    """Per-sample weights (B,) of the squared error: diffusers' compute_loss_weighting_for_sd3."""
    if scheme == "none":
        return jnp.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma ** -2.0
    if scheme == "cosmap":
        return 2 / (jnp.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTING}, got {scheme!r}")


def flow_draws(
    rng: jax.Array, batch: int, shape: tuple[int, ...], *, cond_dropout: float = 0.1,
    num_train_timesteps: int = 1000, shift: float = 1.0, timestep_sampling: str = "uniform",
    logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The random draws of one loss evaluation: (sigma (B,), t (B,), noise (B, *shape), keep (B,) bool).

    sigma is entry idx = floor(1000 u) of the descending table, u from ``timestep_density`` (uniform by
    default: sigma uniform over the table); keep is False with probability ``cond_dropout`` (that
    sample's condition is replaced by zeros).
    """
    k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
    sigmas, timesteps = train_schedule(num_train_timesteps, shift)
    u = timestep_density(k_sigma, batch, timestep_sampling, logit_mean=logit_mean, logit_std=logit_std,
                         mode_scale=mode_scale)
    # u = 1 (a float32 sigmoid saturating, or the mode density at v = 0) would index one past the table;
    # diffusers' scripts would fail there, the nearest entry (sigma = 1/1000) is kept instead.
    idx = jnp.clip(jnp.floor(u * num_train_timesteps).astype(jnp.int32), 0, num_train_timesteps - 1)
    noise = jax.random.normal(k_noise, (batch, *shape), jnp.float32)
    keep = jax.random.uniform(k_drop, (batch,)) >= cond_dropout
    return jnp.asarray(sigmas)[idx], jnp.asarray(timesteps)[idx], noise, keep


def flow_matching_loss(
    head: Any, x0: jax.Array, z: jax.Array, rng: jax.Array, *, cond_dropout: float = 0.1,
    num_train_timesteps: int = 1000, shift: float = 1.0, timestep_sampling: str = "uniform",
    logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29, loss_weighting: str = "none",
) -> jax.Array:
    """Mean over all elements of w(sigma) (head.velocity(x_sigma, 1000 sigma, drop(z)) - (noise - x0))^2,
    float32 (w = 1 for ``loss_weighting`` 'none'; see the module docstring for the others).

    x0 (B, N, C) clean targets, z (B, n_query, H) condition, rng one PRNG key for this batch.
    """
    b = x0.shape[0]
    sigma, t, noise, keep = flow_draws(
        rng, b, x0.shape[1:], cond_dropout=cond_dropout, num_train_timesteps=num_train_timesteps, shift=shift,
        timestep_sampling=timestep_sampling, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
    )
    x0 = x0.astype(jnp.float32)
    s = sigma[:, None, None]
    x_sigma = (1.0 - s) * x0 + s * noise
    z = jnp.where(keep[:, None, None], z, jnp.zeros_like(z))
    pred = head.velocity(x_sigma, t, z).astype(jnp.float32)
    sq = jnp.square(pred - (noise - x0))
    if loss_weighting == "none":  # no multiplication by ones: the reference's loss, bit for bit
        return jnp.mean(sq)
    # Equal token counts per sample, so this is diffusers' mean over samples of per-sample means.
    return jnp.mean(loss_weights(sigma, loss_weighting)[:, None, None] * sq)


# ---------------------------------------------------------------------------------------------
# Sampler

_TRACES = {"sample": 0}  # incremented only while tracing: lets tests check that the loop compiles once


def sample_trace_count() -> int:
    return _TRACES["sample"]


@functools.partial(jax.jit, static_argnums=0)
def _sample(graphdef, state, z, noise, sigmas, timesteps, guidance):
    _TRACES["sample"] += 1
    b = noise.shape[0]
    z_both = jnp.concatenate([jnp.zeros_like(z), z])  # [null; cond], as the reference orders them

    def step(k, carry):
        # The parameters ride in the loop carry and the head is merged inside the body, so heads that
        # use NNX transforms (which refuse variables from an outer trace level) work as well.
        x, params = carry
        head = nnx.merge(graphdef, params)
        x_both = jnp.concatenate([x, x])
        t = jnp.broadcast_to(timesteps[k], (2 * b,))
        v = head.velocity(x_both, t, z_both).astype(jnp.float32)
        v_uncond, v_cond = v[:b], v[b:]
        v = v_uncond + guidance * (v_cond - v_uncond)
        # Euler in float32 with the exact float sigmas; the head saw the truncated integer t.
        return (x.astype(jnp.float32) + (sigmas[k + 1] - sigmas[k]) * v).astype(x.dtype), params

    return jax.lax.fori_loop(0, timesteps.shape[0], step, (noise, state))[0]


def sample_features(
    head: Any, z: jax.Array, noise: jax.Array, num_steps: int = 30, guidance: float = 3.0, *,
    shift: float = 1.0, num_train_timesteps: int = 1000,
) -> jax.Array:
    """Guided Euler sampling from ``noise`` (B, N, C) given the condition z (B, n_query, H) -> (B, N, C).

    Classifier-free guidance: v = v(zeros) + guidance * (v(z) - v(zeros)). Defaults reproduce the
    reference exactly (30 steps, guidance 3.0, no shift).
    """
    sigmas, timesteps = sampling_schedule(num_steps, shift, num_train_timesteps)
    graphdef, state = nnx.split(head)
    return _sample(
        graphdef, state, jnp.asarray(z), jnp.asarray(noise), jnp.asarray(sigmas), jnp.asarray(timesteps),
        jnp.float32(guidance),
    )
