"""Generation heads (docs/model.md 12.1): the registry, the VAE-latent flow head (the DiT with another config)
overfitting a fixed batch, and the CLIP + MSE head learning a toy regression with n_query != N.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blip3o_jax import configlib
from blip3o_jax.models import heads
from blip3o_jax.models.dit import DiTConfig
from blip3o_jax.models.flow import FlowConfig
from tests.references.training import train_fixed_batch

# A VAE-latent target: 4 latent channels on an 8x8 latent grid, 2x2 patches -> 16 DiT tokens.
VAE_CFG = DiTConfig(input_size=8, patch_size=2, in_channels=4, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                    multiple_of=32, latent_embedding_size=32)


def test_registry_is_the_config_schema():
    """configlib's choices and head sections come from the registries, and nothing else names a head."""
    assert set(heads.HEADS) == set(configlib.CHOICES["model.gen_head"])
    assert set(heads.VELOCITY_NETS) == set(configlib.CHOICES["model.denoiser"])
    cfg = configlib.base_config()
    for name, spec in heads.VELOCITY_NETS.items():
        assert cfg.model[name].to_dict() == dataclasses.asdict(spec.config())
    for name, spec in heads.HEADS.items():
        if spec.config is not None:
            assert cfg.model[name].to_dict() == dataclasses.asdict(spec.config())
    assert configlib.head_section(cfg) == "dit" and isinstance(configlib.head_config(cfg), DiTConfig)
    cfg.model.gen_head = "mse"
    assert configlib.head_section(cfg) == "mse" and isinstance(configlib.head_config(cfg), heads.MSEConfig)
    with pytest.raises(ValueError, match="unknown generation head 'nope'"):
        heads.build_head("nope", VAE_CFG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown velocity network"):
        heads.build_head("flow", VAE_CFG, denoiser="nope", rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="takes a DiTConfig"):
        heads.build_head("flow", heads.MSEConfig(), rngs=nnx.Rngs(0))


def test_active_head_is_validated_under_its_own_section():
    cfg = configlib.base_config()
    cfg.model.gen_head = "mse"
    cfg.model.mse.in_channels = 1024  # not the EVA width: the mse section is checked, not model.dit
    with pytest.raises(configlib.ConfigError, match=r"'model\.mse\.in_channels'.*eva\.width"):
        configlib.validate(cfg)
    cfg.model.mse.in_channels = 1792
    cfg.model.dit.n_heads = 5  # the inactive DiT section's own constraints do not apply
    configlib.validate(cfg)
    cfg.model.gen_head = "flow"
    with pytest.raises(configlib.ConfigError, match=r"'model\.dit\.n_heads'.*do not divide dim"):
        configlib.validate(cfg)


def test_flow_head_keeps_the_dit_parameter_paths():
    """The velocity network sits under its registered name: Orbax checkpoints written before the registry
    (``gen_head/dit/...``) and the released-layout mapping keep their paths."""
    head = heads.build_head("flow", VAE_CFG, rngs=nnx.Rngs(0))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(head, nnx.Param))}
    assert paths and all(p.startswith("dit/") for p in paths)
    torch_prefix, nnx_prefix, mapping = heads.torch_mapping("flow", "dit")
    assert (torch_prefix, nnx_prefix) == ("model.dit.model.", "gen_head/dit/")
    assert {r.nnx for r in mapping.rules(VAE_CFG)} <= {p.removeprefix("dit/") for p in paths}
    assert heads.torch_mapping("mse", "dit") is None


def test_head_flop_counts_include_attention():
    cfg = DiTConfig(input_size=4, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, latent_embedding_size=32, in_channels=8)
    dense = 2.0 * 1000 * 16
    self_attn = 4.0 * 2 * 16 * 16 * 64
    cross = 4.0 * 2 * 16 * 5 * 64
    assert heads.forward_flops("flow", "dit", cfg, 5, 1000) == dense + self_attn + cross
    mse = heads.MSEConfig(input_size=4, in_channels=8, latent_embedding_size=16, dim=32)
    assert heads.forward_flops("mse", "dit", mse, 4, 0) == 2.0 * 4 * (16 * 32 + 32 * 8) + 2.0 * 16 * 4 * 8


def test_vae_latent_flow_head_overfits_a_fixed_batch():
    head = heads.build_head("flow", VAE_CFG, flow_cfg=FlowConfig(cond_dropout=0.25), remat="full",
                            rngs=nnx.Rngs(0))
    assert isinstance(head, heads.GenHead) and head.target_shape == (64, 4)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 64, 4)).astype(np.float32)
    z = rng.standard_normal((4, 5, 32)).astype(np.float32)
    key = jax.random.key(0)  # the same sigma, noise and dropout every step: a fixed regression problem
    losses = train_fixed_batch(head, lambda h: h.loss(x0, z, key), steps=60, lr=3e-3)
    assert losses[-1] < losses[0] / 10, losses[::10]

    out = head.sample(z, jax.random.key(1), num_steps=4)  # noise drawn from a key
    assert out.shape == (4, 64, 4) and np.isfinite(np.asarray(out)).all()


def test_mse_head_regresses_targets_with_fewer_queries():
    n_query = 4  # 2x2 query grid onto the 4x4 target grid through the learned token map
    cfg = heads.MSEConfig(input_size=4, in_channels=8, dim=32, latent_embedding_size=16)
    head = heads.build_head("mse", cfg, n_query=n_query, rngs=nnx.Rngs(0))
    assert isinstance(head, heads.GenHead) and head.token_map[...].shape == (16, n_query)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, n_query, 16)).astype(np.float32)
    x0 = np.tanh(np.einsum("nq,bqh,hc->bnc", heads.interpolation_matrix(16, n_query), z,
                           rng.standard_normal((16, 8)) / 4)).astype(np.float32)
    losses = train_fixed_batch(head, lambda h: h.loss(x0, z, None), steps=100, lr=1e-2)
    assert losses[-1] < losses[0] / 10, losses[::20]
    out = head.sample(z, None)
    assert out.shape == x0.shape
    np.testing.assert_allclose(float(jnp.mean((out - x0) ** 2)), losses[-1], rtol=0.5)


def test_mse_head_without_token_map_when_counts_match():
    cfg = heads.MSEConfig(input_size=2, in_channels=3, dim=8, latent_embedding_size=5)
    head = heads.build_head("mse", cfg, n_query=4, rngs=nnx.Rngs(0))
    assert head.token_map is None
    assert head.sample(jnp.ones((2, 4, 5)), None).shape == (2, 4, 3)


def test_interpolation_matrix():
    np.testing.assert_array_equal(heads.interpolation_matrix(16, 16), np.eye(16))
    a = heads.interpolation_matrix(64, 16)  # bilinear 4x4 -> 8x8
    np.testing.assert_allclose(a.sum(1), 1, rtol=1e-6)
    grid = np.arange(16, dtype=np.float32).reshape(4, 4)
    up = (a @ grid.reshape(16)).reshape(8, 8)
    assert up[0, 0] == grid[0, 0] and up[-1, -1] == grid[-1, -1]
    np.testing.assert_allclose(heads.interpolation_matrix(5, 3).sum(1), 1, rtol=1e-6)


def test_configs_stored_before_the_registry_still_load():
    """An 'mse' model's config.json from before ``model.mse`` existed kept its sizes in ``model.dit``."""
    old = configlib.base_config().to_dict()
    old["model"].pop("mse")
    old["model"].pop("denoiser")
    old["model"]["gen_head"] = "mse"
    old["model"]["dit"].update(input_size=4, in_channels=64, dim=96, latent_embedding_size=128)
    cfg = configlib.from_dict(old)
    assert configlib.head_config(cfg) == heads.MSEConfig(input_size=4, in_channels=64, latent_embedding_size=128,
                                                          dim=96)
    assert cfg.model.denoiser == "dit"
