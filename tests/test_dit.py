"""DiT head (docs/model.md 5): parity with diffusers' LuminaNextDiT2DModel through the real converter path,
released parameter counts, mapping coverage errors, and sharding on a (2, 2, 2) mesh.

Reference = diffusers 0.42.1 ``LuminaNextDiT2DModel`` built tiny with ``cross_attention_dim = dim`` plus
an external ``PixArtAlphaTextProjection(act_fn='gelu_tanh')`` applied to z (docs/model.md 5.5), random
weights (norm scales, biases and cross-attention gates perturbed away from their identity/zero init so
every path is exercised), state dict saved to safetensors under ``model.dit.model.`` and loaded through
``dit_mapping.load`` (TorchCheckpoint + weights.load_component). Float32, rtol 1e-5 and
atol = 1e-5 * max|reference output|.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from blip3o_jax import sharding, weights
from blip3o_jax.models import dit_mapping
from blip3o_jax.models.dit import DiT, DiTConfig, ffn_hidden_dim
from tests.references.dit import TINY, build_reference, reference_state_dict, reference_velocity, save_and_load

CASES = {
    # name: (config, grid, timesteps)
    "patch1": (TINY, (4, 4), np.array([0.0, 437.5, 1000.0], np.float32)),
    "patch2_gqa_ffnmult": (
        dataclasses.replace(TINY, patch_size=2, n_kv_heads=2, ffn_dim_multiplier=1.3, n_layers=3),
        (4, 4), np.array([1000, 966, 33], np.int64),
    ),
    "nonsquare_no_qknorm": (
        dataclasses.replace(TINY, n_heads=2, n_kv_heads=1, qk_norm=False, in_channels=16),
        (2, 6), np.array([999.0, 1.0, 500.0], np.float32),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_diffusers(name, tmp_path):
    cfg, grid, t = CASES[name]
    dit, cap = build_reference(cfg)
    assert ffn_hidden_dim(cfg) == dit.layers[0].feed_forward.linear_1.out_features
    model = save_and_load(tmp_path, reference_state_dict(dit, cap), cfg)

    rng = np.random.default_rng(1)
    b, n = len(t), grid[0] * grid[1]
    x = rng.standard_normal((b, n, cfg.in_channels)).astype(np.float32)
    z = rng.standard_normal((b, 6, cfg.latent_embedding_size)).astype(np.float32)
    want = reference_velocity(dit, cap, cfg, x, t, z, grid)
    got = np.asarray(jax.jit(lambda m, x, t, z: m.velocity(x, t, z, grid=grid))(model, x, t, z))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_export_round_trips(tmp_path):
    dit, cap = build_reference(TINY)
    sd = reference_state_dict(dit, cap)
    model = save_and_load(tmp_path, sd, TINY)
    exported = dict(dit_mapping.export(model))
    assert exported.keys() == sd.keys()
    for k, v in sd.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def _param_count(cfg: DiTConfig) -> int:
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))  # shapes only, no allocation
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_released_sizes():
    assert ffn_hidden_dim(DiTConfig()) == 4864
    assert _param_count(DiTConfig()) == 1_365_010_336  # 8B (condition width 3584)
    assert _param_count(DiTConfig(latent_embedding_size=2048)) == 1_362_257_824  # 4B


def test_mapping_coverage_errors_list_every_key(tmp_path):
    dit, cap = build_reference(TINY)
    sd = reference_state_dict(dit, cap)
    p = dit_mapping.PREFIX
    dropped = [p + "layers.1.attn2.to_out.0.weight", p + "norm_out.linear_2.bias"]
    for k in dropped:
        del sd[k]
    sd[p + "layers.0.gate_renamed"] = sd.pop(p + "layers.0.gate")
    sd[p + "pad_token"] = np.zeros(TINY.dim, np.float32)
    sd[p + "caption_projection.linear_1.weight"] = np.zeros((TINY.dim, 7), np.float32)
    with pytest.raises(weights.CheckpointMismatchError) as err:
        save_and_load(tmp_path, sd, TINY)
    e = err.value
    assert sorted(k for k, _ in e.missing) == sorted(dropped + [p + "layers.0.gate"])
    assert sorted(k for k, _ in e.unexpected) == sorted([p + "layers.0.gate_renamed", p + "pad_token"])
    assert [k for k, *_ in e.mismatched] == [p + "caption_projection.linear_1.weight"]
    for k in dropped + [p + "pad_token", p + "layers.0.gate_renamed"]:
        assert k in str(e)


def test_sharded_forward_on_2x2x2_mesh():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.rules_for("fsdp")
    cfg = dataclasses.replace(TINY, n_kv_heads=2)
    model = sharding.create_sharded(lambda: DiT(cfg, rules=rules, remat="full", rngs=nnx.Rngs(0)), mesh, rules)
    spec = lambda v: v[...].sharding.spec  # noqa: E731
    assert spec(model.layers.attn1.to_q.kernel) == P(None, "fsdp", "tensor")
    assert spec(model.layers.attn2.to_k.kernel) == P(None, "fsdp", "tensor")
    assert spec(model.layers.attn2.to_out.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.layers.feed_forward.linear_2.kernel) == P(None, "tensor", "fsdp")
    assert spec(model.caption_projection.linear_1.kernel) == P("fsdp", "tensor")
    assert spec(model.layers.gate) == P(None, None)

    x = jnp.ones((4, 16, cfg.in_channels))
    z = jnp.ones((4, 6, cfg.latent_embedding_size))
    t = jnp.array([0.0, 10.0, 500.0, 1000.0])
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, x, t, z: m.velocity(x, t, z))(model, x, t, z)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
