"""The MLP-Mixer velocity network (blip3o_jax/models/denoisers/mixer.py), the worked example of
docs/ADDING_A_HEAD.md: its adaLN-Zero start in closed form, its FLOP count against the traced matmuls,
its logical axes on a real (data, fsdp, tensor) mesh, a flow head running it overfitting a fixed batch,
the sampler compiling once, conversion leaving it alone; then the trainer and generate CLIs end to end
with ``model.denoiser=mixer``."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from blip3o_jax import checkpoints, configlib, conversion, sharding
from blip3o_jax.models import blip3o as model_lib
from blip3o_jax.models import flow, heads
from blip3o_jax.models.denoisers.mixer import Mixer, MixerConfig
from blip3o_jax.models.flow import FlowConfig
from tests.references.configs import demo_config
from tests.references.training import train_fixed_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = MixerConfig(input_size=4, in_channels=8, latent_embedding_size=16, dim=32, n_layers=2, token_mlp_dim=8,
                   channel_mlp_dim=64)
# The demo's target (configs/demo.py: 4x4 pooled EVA tokens of width 64, LLM hidden size 64).
DEMO_MIXER = dict(input_size=4, in_channels=64, latent_embedding_size=64, dim=64, n_layers=2, token_mlp_dim=32,
                  channel_mlp_dim=128)


def inputs(batch=3, n_query=5, seed=0, cfg=TINY):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.num_tokens, cfg.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1000, batch).astype(np.float32)
    z = rng.standard_normal((batch, n_query, cfg.latent_embedding_size)).astype(np.float32)
    return x, t, z


def perturbed(model: nnx.Module, seed: int = 0) -> dict:
    """Every parameter replaced by small random values (the zero-initialised modulations included), so a
    comparison exercises every block rather than the identity the network starts as."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype),
                        nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def dot_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general in a jaxpr, scan bodies counted once per iteration."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += repeat * dot_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeat * dot_flops(sub)
    return total


# ---------------------------------------------------------------------------------------------
# The network


def test_registered_with_its_config_section_and_no_released_layout():
    spec = heads.velocity_net_spec("mixer")
    assert spec.module is Mixer and spec.config is MixerConfig and spec.mapping is None
    assert heads.torch_mapping("flow", "mixer") is None and heads.activation_shape("flow", "mixer", TINY, 5) is None
    cfg = configlib.base_config()
    cfg.model.denoiser = "mixer"
    assert configlib.head_section(cfg) == "mixer" and configlib.head_config(cfg) == MixerConfig()
    configlib.validate(cfg)  # the defaults fit the released EVA-CLIP target and the 8B backbone
    cfg.model.mixer.in_channels = 1024
    with pytest.raises(configlib.ConfigError, match=r"'model\.mixer\.in_channels'.*eva\.width"):
        configlib.validate(cfg)
    cfg.model.mixer.in_channels = 1792
    cfg.model.mixer.norm_eps = 0.0
    with pytest.raises(configlib.ConfigError, match=r"'model\.mixer\.norm_eps': must be > 0"):
        configlib.validate(cfg)


def test_shapes_dtypes_and_the_identity_start_in_closed_form():
    head = heads.build_head("flow", TINY, denoiser="mixer", rngs=nnx.Rngs(0))
    assert isinstance(head, heads.GenHead) and head.target_shape == (16, 8) and isinstance(head.mixer, Mixer)
    x, t, z = inputs()
    v = np.asarray(head.velocity(x, t, z))
    assert v.shape == x.shape and v.dtype == np.float32
    # adaLN-Zero: every block's gates (and shifts, scales) start at zero, so the blocks are identities and
    # the output is out_proj(LayerNorm(in_proj(x))), exactly the same for any timestep and condition.
    p = nnx.to_pure_dict(nnx.state(head.mixer, nnx.Param))
    h = x.astype(np.float64) @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + TINY.norm_eps)
    np.testing.assert_allclose(v, h @ p["out_proj"]["kernel"] + p["out_proj"]["bias"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(head.velocity(x, 1000 - t, np.zeros_like(z))), v)
    with pytest.raises(ValueError, match="built for 16 tokens"):
        head.velocity(x[:, :9], t, z)

    # Compute dtype honoured, parameters and output stay float32.
    bf16 = Mixer(TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    nnx.update(bf16, perturbed(bf16))
    f32 = head.mixer
    nnx.update(f32, perturbed(f32))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    lo, hi = np.asarray(bf16.velocity(x, t, z)), np.asarray(f32.velocity(x, t, z))
    assert lo.dtype == np.float32 and np.abs(lo - hi).max() < 0.05 * np.abs(hi).max()
    assert np.abs(lo - hi).max() > 0  # really computed in bfloat16


def test_flop_count_equals_the_traced_matmuls():
    batch, n_query = 3, 5
    model = Mixer(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x, t, z: nnx.merge(graphdef, s).velocity(x, t, z))(state, *inputs(batch, n_query))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert heads.forward_flops("flow", "mixer", TINY, n_query, params) == dot_flops(jaxpr.jaxpr) / batch


def test_parameters_are_placed_by_their_logical_axes_on_a_mesh():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.rules_for("fsdp")
    sharded = sharding.create_sharded(lambda: Mixer(TINY, rules=rules, rngs=nnx.Rngs(0)), mesh, rules)
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var[...].ndim, (path, names)
    p = nnx.to_pure_dict(nnx.state(sharded, nnx.Param))
    P = jax.sharding.PartitionSpec
    assert p["layers"]["channel_mlp"]["linear_1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert p["layers"]["token_mlp"]["linear_1"]["kernel"].sharding.spec == P(None, None, "tensor")
    assert p["in_proj"]["kernel"].sharding.spec == P(None, "fsdp")

    single = Mixer(TINY, rngs=nnx.Rngs(0))
    values = perturbed(single)
    nnx.update(single, values)
    shardings = jax.tree.map(lambda a: a.sharding, p)
    nnx.update(sharded, jax.device_put(values, shardings))
    x, t, z = inputs(batch=4)
    graphdef, state = nnx.split(sharded)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda s, x, t, z: nnx.merge(graphdef, s).velocity(x, t, z))(state, x, t, z)
    # Sharded contractions sum in another order: float32 rounding, nothing more.
    np.testing.assert_allclose(np.asarray(got), np.asarray(single.velocity(x, t, z)), rtol=1e-5, atol=1e-5)


def test_flow_head_overfits_a_fixed_batch_and_the_sampler_compiles_once():
    head = heads.build_head("flow", TINY, denoiser="mixer", flow_cfg=FlowConfig(cond_dropout=0.25), remat="full",
                            rngs=nnx.Rngs(0))
    x0, _, z = inputs(batch=4)
    key = jax.random.key(0)  # the same sigma, noise and dropout every step: a fixed regression problem
    losses = train_fixed_batch(head, lambda h: h.loss(x0, z, key), steps=60, lr=3e-3)
    assert losses[-1] < losses[0] / 10, losses[::10]

    noise = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32)
    before = flow.sample_trace_count()
    a = np.asarray(head.sample(z, noise, num_steps=4))
    assert flow.sample_trace_count() == before + 1
    # New noise, condition and guidance: the same compiled loop.
    b = np.asarray(head.sample(z + 1, noise * 2, num_steps=4, guidance=1.5))
    assert flow.sample_trace_count() == before + 1
    assert a.shape == x0.shape and np.isfinite(a).all() and not np.allclose(a, b)


def test_conversion_refuses_to_export_and_loads_the_rest_of_a_released_checkpoint(tmp_path):
    mesh = conversion.host_mesh()  # one device: what convert uses, and 8 fake ones would only slow this down
    dit_cfg = demo_config()
    released = model_lib.build_model(dit_cfg, mesh)
    conversion.save_torch(released, tmp_path / "released", config=dit_cfg)

    mixer_cfg = demo_config(**{"model.denoiser": "mixer", **{f"model.mixer.{k}": v for k, v in DEMO_MIXER.items()}})
    model = model_lib.build_model(mixer_cfg, mesh, seed=1)
    before = flat_params(model)
    conversion.load_into(model, tmp_path / "released")  # the model.dit.* tensors are skipped, not an error
    want, got = flat_params(released), flat_params(model)
    loaded = [k for k in got if not k.startswith("gen_head/")]
    assert {k.split("/")[0] for k in loaded} == {"backbone", "latent_queries", "target_encoder"}
    assert all(not np.array_equal(before[k], want[k]) for k in loaded if before[k].std() > 0)  # seeds differ
    for k in loaded:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert any(k.startswith("gen_head/mixer/") for k in got)
    for k in got.keys() - set(loaded):  # the mixer keeps its own initialisation
        np.testing.assert_array_equal(got[k], before[k], err_msg=k)
    with pytest.raises(ValueError, match=r"model\.denoiser 'mixer'.*no released PyTorch layout"):
        conversion.save_torch(model, tmp_path / "exported", config=mixer_cfg)

    # A model checkpoint of this project with the DiT head (train.init_from=DIR) does the same.
    checkpoints.save_model(str(tmp_path / "orbax"), released, dit_cfg)
    model = model_lib.build_model(mixer_cfg, mesh, seed=1)
    checkpoints.restore_into(model, tmp_path / "orbax")
    got = flat_params(model)
    for k in loaded:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for k in got.keys() - set(loaded):
        np.testing.assert_array_equal(got[k], before[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# The real CLIs


def saved_params(params_dir: pathlib.Path) -> dict:
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(str(params_dir / "params"))


def run(args: list[str]) -> subprocess.CompletedProcess:
    # One CPU device, as `make demo` runs: the suite's 8 fake devices would only slow a tiny run down.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_train_then_generate_through_the_clis(tmp_path):
    workdir, features = tmp_path / "run", tmp_path / "features.npy"
    train = ["blip3o_jax.train", "--config", "configs/demo.py:smoke", "--workdir", str(workdir),
             "--config.train.stage=generation", "--config.model.denoiser=mixer",
             *[f"--config.model.mixer.{k}={v}" for k, v in DEMO_MIXER.items()],
             "--config.train.num_steps=3", "--config.data.global_batch_size=4", "--config.train.log_every=1"]
    run(train)
    params_dir = workdir / "params"
    config = json.loads((params_dir / "config.json").read_text())
    assert config["model"]["denoiser"] == "mixer"
    assert config["model"]["mixer"] == {**dataclasses.asdict(MixerConfig()), **DEMO_MIXER}
    first = saved_params(params_dir)
    assert set(first["gen_head"]) == {"mixer"}
    # Trained: the adaLN modulations, zero at initialisation, have moved.
    assert np.abs(first["gen_head"]["mixer"]["layers"]["modulation"]["kernel"]).max() > 0
    metrics = (workdir / "metrics.jsonl").read_text()
    assert [json.loads(line)["step"] for line in metrics.splitlines()] == [1, 2, 3]

    # The same command again: resumes at the end, trains nothing, rewrites the same model checkpoint.
    again = run(train)
    assert "resumed from step 3" in again.stdout + again.stderr
    assert (workdir / "metrics.jsonl").read_text() == metrics
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), saved_params(params_dir), first)

    # Features only: no decoder in this checkpoint, so no --out; the tokenizer came with W/params.
    done = run(["blip3o_jax.generate", "--checkpoint", str(workdir), "--prompt", "a red circle at the top",
                "--features-out", str(features), "--steps", "2"])
    assert f"wrote {features}" in done.stdout
    feats = np.load(features)
    assert feats.shape == (1, 4 * 4, 64) and feats.dtype == np.float32 and np.isfinite(feats).all()

    # The checkpoint restores into a model whose velocity is the one of the parameters the trainer saved.
    model, cfg = checkpoints.load_model(workdir, mesh=conversion.host_mesh())
    assert cfg.model.denoiser == "mixer" and isinstance(model.gen_head.net, Mixer)
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: heads.build_head("flow", MixerConfig(**DEMO_MIXER), denoiser="mixer", rngs=nnx.Rngs(7))))
    nnx.replace_by_pure_dict(state, first["gen_head"])
    head = nnx.merge(graphdef, state)
    x, t, z = inputs(batch=2, n_query=16, cfg=MixerConfig(**DEMO_MIXER))
    np.testing.assert_array_equal(np.asarray(model.velocity(x, t, z)), np.asarray(head.velocity(x, t, z)))
