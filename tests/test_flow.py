"""Flow matching (docs/model.md 6, 7): schedules vs diffusers' FlowMatchEulerDiscreteScheduler, the loss
formula for fixed draws, guided sampling vs a PyTorch loop over the diffusers DiT, one compilation of
the sampling loop. (A tiny flow head overfitting a fixed batch: tests/test_heads.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip3o_jax.models import flow
from tests.references.dit import TINY, build_reference, reference_state_dict, save_and_load
from tests.references.flow import guided_sample, scheduler

REFERENCE_TIMESTEPS = [1000, 966, 933, 900, 866, 833, 800, 766, 733, 700, 666, 633, 600, 566, 533, 500, 466,
                       433, 400, 366, 333, 300, 266, 233, 200, 166, 133, 100, 66, 33]  # docs/model.md 7


def test_default_sampling_schedule_is_the_reference():
    sigmas, timesteps = flow.sampling_schedule()
    assert timesteps.tolist() == REFERENCE_TIMESTEPS
    np.testing.assert_array_equal(sigmas[:-1], np.linspace(1.0, 1 / 30, 30).astype(np.float32))
    assert sigmas[-1] == 0 and sigmas.dtype == np.float32


@pytest.mark.parametrize("num_steps,shift", [(30, 1.0), (10, 3.0), (50, 0.5)])
def test_sampling_schedule_matches_diffusers(num_steps, shift):
    sched = scheduler(shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    sigmas, timesteps = flow.sampling_schedule(num_steps, shift)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.long().numpy())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_training_table_matches_diffusers(shift):
    sched = scheduler(shift)
    sigmas, timesteps = flow.train_schedule(1000, shift)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.numpy())
    if shift == 1.0:
        np.testing.assert_allclose(sigmas, np.arange(1000, 0, -1) / 1000, rtol=1e-7)


def test_draws_are_uniform_over_the_table_with_dropout():
    sigma, t, noise, keep = flow.flow_draws(jax.random.key(0), 20000, (3,), cond_dropout=0.1)
    sigma, t, keep = np.asarray(sigma), np.asarray(t), np.asarray(keep)
    table = flow.train_schedule()[0]
    assert np.isin(sigma, table).all()
    np.testing.assert_array_equal(t, sigma * np.float32(1000))
    assert abs(sigma.mean() - 0.5005) < 0.01 and len(np.unique(sigma)) > 990
    assert abs((~keep).mean() - 0.1) < 0.01
    assert noise.shape == (20000, 3) and abs(float(noise.std()) - 1) < 0.02


class ToyHead:
    """A known velocity function, so the loss can be recomputed by hand."""

    def velocity(self, x, t, z):
        return 0.5 * x + t[:, None, None] / 1000.0 + jnp.mean(z, axis=(1, 2))[:, None, None]


def test_loss_equals_formula_for_fixed_draws():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((8, 5, 3)).astype(np.float32)
    z = 1 + rng.standard_normal((8, 4, 6)).astype(np.float32)
    key = jax.random.key(3)
    loss = flow.flow_matching_loss(ToyHead(), x0, z, key, cond_dropout=0.5)

    sigma, t, noise, keep = (np.asarray(a) for a in flow.flow_draws(key, 8, (5, 3), cond_dropout=0.5))
    assert 0 < keep.sum() < 8  # both branches of the dropout are exercised
    s = sigma[:, None, None]
    x_sigma = (1 - s) * x0 + s * noise
    z_used = z * keep[:, None, None]
    pred = 0.5 * x_sigma + t[:, None, None] / 1000 + z_used.mean(axis=(1, 2))[:, None, None]
    want = np.mean((pred - (noise - x0)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    dit, cap = build_reference(TINY, seed=3)
    model = save_and_load(tmp_path_factory.mktemp("dit"), reference_state_dict(dit, cap), TINY)
    return dit, cap, model


def test_guided_sampling_matches_diffusers_loop(tiny_pair):
    dit, cap, model = tiny_pair
    rng = np.random.default_rng(5)
    b, side, c = 2, TINY.input_size, TINY.in_channels
    noise = rng.standard_normal((b, side * side, c)).astype(np.float32)
    z = rng.standard_normal((b, 6, TINY.latent_embedding_size)).astype(np.float32)
    want = guided_sample(dit, cap, TINY, z, noise, num_steps=30)

    got = np.asarray(flow.sample_features(model, z, noise))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_sampler_compiles_once(tiny_pair):
    model = tiny_pair[2]
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((3, 16, TINY.in_channels)).astype(np.float32)
    z = rng.standard_normal((3, 6, TINY.latent_embedding_size)).astype(np.float32)
    before = flow.sample_trace_count()
    a = flow.sample_features(model, z, noise, num_steps=8)
    assert flow.sample_trace_count() == before + 1
    # New noise, condition, guidance and shift: same compiled loop.
    b = flow.sample_features(model, z + 1, noise * 2, num_steps=8, guidance=1.5, shift=2.0)
    assert flow.sample_trace_count() == before + 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
