"""Timestep densities and loss weightings of flow matching (models/flow.py), as diffusers' SD3 training
utilities define them: each density's distribution over many draws against its exact CDF (and against
diffusers' own draws), each weighting against diffusers' formula, and the default uniform / none path
bit-identical to the loss as it was computed before these options existed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from scipy import special, stats

from blip3o_jax import configlib
from blip3o_jax.models import flow, heads
from tests.references.configs import demo_config

N = 200_000  # draws per distribution test
# Kolmogorov-Smirnov bound at p = 0.001 for N draws: a correct sampler exceeds it once in a thousand runs
# (the keys are fixed, so never here); a wrong mean, spread, direction or formula is far beyond it.
KS_BOUND = 1.95 / np.sqrt(N)


def diffusers_training_utils():
    # diffusers.training_utils imports its UNet (and transformers' vision models): the torchvision shim of
    # tests/conftest.py makes that work beside CPU torch.
    from diffusers import training_utils

    return training_utils


def drawn_indices(scheme, **kw):
    """Table indices of N draws: sigma = table[idx], idx = floor(1000 u); recovered from sigma."""
    sigma = np.asarray(flow.flow_draws(jax.random.key(7), N, (1,), timestep_sampling=scheme, **kw)[0])
    table = flow.train_schedule()[0]
    assert np.isin(sigma, table).all()
    return np.round(1000 - sigma * 1000).astype(np.int64)  # table[k] = (1000 - k) / 1000


def ks_distance(idx, cdf_of_u):
    """max_k |P_empirical(idx <= k) - P(u < (k + 1) / 1000)| over the 1000 entries."""
    counts = np.bincount(idx, minlength=1000)
    empirical = np.cumsum(counts) / len(idx)
    exact = cdf_of_u(np.arange(1, 1001) / 1000)
    return np.abs(empirical - exact).max()


def mode_cdf(scale):
    """P(u <= x) for u = f(v) = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U[0, 1): f decreases from 1 to 0,
    so P(u <= x) = 1 - f^-1(x), f^-1 by bisection."""
    f = lambda v: 1 - v - scale * (np.cos(np.pi * v / 2) ** 2 - 1 + v)

    def cdf(x):
        lo, hi = np.zeros_like(x), np.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f(mid) > x
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    return cdf


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_logit_normal_draws_follow_their_cdf(mean, std):
    idx = drawn_indices("logit_normal", logit_mean=mean, logit_std=std)
    cdf = lambda x: stats.norm.cdf((special.logit(np.clip(x, 1e-12, 1 - 1e-12)) - mean) / std)
    assert ks_distance(idx, cdf) < KS_BOUND
    if mean != 0.0:  # the same draws read in the wrong direction (sigma = u instead of 1 - u) fail
        assert ks_distance(999 - idx, cdf) > 10 * KS_BOUND
    # A wrong spread fails too.
    wrong = lambda x: stats.norm.cdf((special.logit(np.clip(x, 1e-12, 1 - 1e-12)) - mean) / (std * 1.1))
    assert ks_distance(idx, wrong) > 3 * KS_BOUND


@pytest.mark.parametrize("scale", [1.29, 0.5, -0.8])
def test_mode_draws_follow_their_cdf(scale):
    idx = drawn_indices("mode", mode_scale=scale)
    assert ks_distance(idx, mode_cdf(scale)) < KS_BOUND
    assert ks_distance(idx, mode_cdf(scale + 0.2)) > 3 * KS_BOUND
    assert ks_distance(idx, lambda x: x) > 3 * KS_BOUND  # not uniform


def test_uniform_draws_follow_their_cdf():
    idx = drawn_indices("uniform")
    assert ks_distance(idx, lambda x: x) < KS_BOUND


@pytest.mark.parametrize("scheme,kw", [("logit_normal", dict(logit_mean=0.3, logit_std=1.2)),
                                       ("mode", dict(mode_scale=1.29)), ("uniform", {})])
def test_densities_match_diffusers_draws(scheme, kw):
    """Two-sample KS against compute_density_for_timestep_sampling itself (its torch generator)."""
    tu = diffusers_training_utils()
    want = tu.compute_density_for_timestep_sampling(scheme, N, generator=torch.Generator().manual_seed(0),
                                                    **{"logit_mean": None, "logit_std": None, "mode_scale": None,
                                                       **kw}).numpy()
    got = np.asarray(flow.timestep_density(jax.random.key(1), N, scheme, **kw))
    assert stats.ks_2samp(got, want).statistic < np.sqrt(2) * KS_BOUND  # the two-sample bound at p = 0.001


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_weightings_match_diffusers_formula(scheme):
    tu = diffusers_training_utils()
    sigma = flow.train_schedule()[0]
    want = tu.compute_loss_weighting_for_sd3(scheme, torch.from_numpy(sigma)).numpy()
    got = np.asarray(flow.loss_weights(jnp.asarray(sigma), scheme))
    np.testing.assert_allclose(got, want, rtol=1e-6)


class ToyHead:
    def velocity(self, x, t, z):
        return 0.5 * x + t[:, None, None] / 1000.0 + jnp.mean(z, axis=(1, 2))[:, None, None]


def toy_batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, 5, 3)).astype(np.float32), 1 + rng.standard_normal((16, 4, 6)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap"])
def test_weighted_loss_is_diffusers_per_sample_mean(scheme):
    """train_dreambooth_sd3.py: mean over samples of mean(w * (pred - target)^2) over each sample."""
    tu = diffusers_training_utils()
    x0, z = toy_batch()
    key = jax.random.key(4)
    kw = dict(cond_dropout=0.25, timestep_sampling="logit_normal")
    loss = flow.flow_matching_loss(ToyHead(), x0, z, key, loss_weighting=scheme, **kw)
    sigma, t, noise, keep = (np.asarray(a) for a in flow.flow_draws(key, 16, (5, 3), **kw))
    s = sigma[:, None, None]
    x_sigma = (1 - s) * x0 + s * noise
    pred = 0.5 * x_sigma + t[:, None, None] / 1000 + (z * keep[:, None, None]).mean(axis=(1, 2))[:, None, None]
    w = tu.compute_loss_weighting_for_sd3(scheme, torch.from_numpy(np.array(s))).numpy()
    want = np.mean(np.mean(w * (pred - (noise - x0)) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# ---- The default path: bit-identical to the code before timestep_sampling / loss_weighting ----------

def old_flow_draws(rng, batch, shape, *, cond_dropout=0.1, num_train_timesteps=1000, shift=1.0):
    """models/flow.py flow_draws as it was (commit 2233032)."""
    k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
    sigmas, timesteps = flow.train_schedule(num_train_timesteps, shift)
    u = jax.random.uniform(k_sigma, (batch,))
    idx = jnp.minimum(jnp.floor(u * num_train_timesteps).astype(jnp.int32), num_train_timesteps - 1)
    noise = jax.random.normal(k_noise, (batch, *shape), jnp.float32)
    keep = jax.random.uniform(k_drop, (batch,)) >= cond_dropout
    return jnp.asarray(sigmas)[idx], jnp.asarray(timesteps)[idx], noise, keep


def old_flow_matching_loss(head, x0, z, rng, *, cond_dropout=0.1, num_train_timesteps=1000, shift=1.0):
    """models/flow.py flow_matching_loss as it was (commit 2233032)."""
    b = x0.shape[0]
    sigma, t, noise, keep = old_flow_draws(rng, b, x0.shape[1:], cond_dropout=cond_dropout,
                                           num_train_timesteps=num_train_timesteps, shift=shift)
    x0 = x0.astype(jnp.float32)
    s = sigma[:, None, None]
    x_sigma = (1.0 - s) * x0 + s * noise
    z = jnp.where(keep[:, None, None], z, jnp.zeros_like(z))
    pred = head.velocity(x_sigma, t, z).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - (noise - x0)))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_uniform_unweighted_is_bit_identical_to_before(shift):
    x0, z = toy_batch()
    for seed in range(3):
        key = jax.random.key(seed)
        for new, old in ((flow.flow_draws(key, 16, (5, 3), shift=shift), old_flow_draws(key, 16, (5, 3), shift=shift)),):
            for a, b in zip(new, old):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        loss = lambda fn: jax.jit(jax.value_and_grad(lambda x: fn(ToyHead(), x, z, key, shift=shift)))(x0)
        (l_new, g_new), (l_old, g_old) = loss(flow.flow_matching_loss), loss(old_flow_matching_loss)
        assert np.asarray(l_new).tobytes() == np.asarray(l_old).tobytes()
        np.testing.assert_array_equal(np.asarray(g_new), np.asarray(g_old))


def test_flow_head_reads_the_config_section():
    """The config's flow.* reach FlowHead.loss (models/heads.py): its loss is flow_matching_loss with them."""
    cfg = demo_config(**{"train.stage": "generation", "flow.timestep_sampling": "mode", "flow.mode_scale": 0.7,
                         "flow.loss_weighting": "cosmap"})
    configlib.validate(cfg)
    f = flow.FlowConfig.from_config(cfg.flow)
    assert (f.timestep_sampling, f.mode_scale, f.loss_weighting) == ("mode", 0.7, "cosmap")
    head = heads.build_head("flow", configlib.head_config(cfg), flow_cfg=f, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, *head.target_shape)).astype(np.float32)
    z = rng.standard_normal((4, 3, cfg.model.llm.hidden_size)).astype(np.float32)
    key = jax.random.key(2)
    kw = dict(cond_dropout=f.cond_dropout, timestep_sampling="mode", mode_scale=0.7)
    got = float(head.loss(x0, z, key))
    assert got == float(flow.flow_matching_loss(head.net, x0, z, key, loss_weighting="cosmap", **kw))
    assert got != float(flow.flow_matching_loss(head.net, x0, z, key, **kw))  # the weighting is applied


@pytest.mark.parametrize("key,value,needle", [
    ("flow.timestep_sampling", "lognorm", "flow.timestep_sampling"),
    ("flow.loss_weighting", "sqrt", "flow.loss_weighting"),
    ("flow.logit_std", 0.0, "flow.logit_std"),
    ("flow.mode_scale", 2.0, "flow.mode_scale"),
    ("flow.mode_scale", -1.5, "flow.mode_scale"),
])
def test_bad_values_name_the_key(key, value, needle):
    cfg = demo_config(**{key: value})
    with pytest.raises(configlib.ConfigError, match=needle.replace(".", r"\.")):
        configlib.validate(cfg)
