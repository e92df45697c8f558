"""The planner: parameter counts of the released configs equal the reference's, and its per-device
memory for the demo model on an 8-device (data=2, fsdp=4) CPU mesh agrees with the bytes of the live
parameters, gradients and optimizer state of a real step (within 10%; measured: exact up to
optax's scalar counters)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from blip3o_jax.models import blip3o as model_lib
from blip3o_jax import optim, plan, sharding, training
from blip3o_jax import train as train_lib
from tests.references.configs import demo_config, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIT_PARAMS = {"blip3o_8b": 1_365_010_336, "blip3o_4b": 1_362_257_824}  # docs/model.md 5.1


def test_cli_released_8b_parameter_counts():
    # --no-aot: no compile (the full-size TPU compiles are benchmarks/tpu_plans.py, minutes each).
    out = subprocess.run([sys.executable, "-m", "blip3o_jax.plan", "--config", "configs/blip3o_8b.py",
                          "--mesh", "data=4,fsdp=8,tensor=1", "--device", "v5p", "--json", "--no-aot"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    p = json.loads(out.stdout)
    assert p["params_by_component"]["gen_head"] == [DIT_PARAMS["blip3o_8b"]] * 2  # total, all trainable
    assert p["params_by_component"]["llm"][1] == 0 and p["params_by_component"]["target_encoder"][1] == 0
    assert p["num_devices"] == 32 and p["fits"] and p["aot"] is None


def test_without_libtpu_the_planner_says_how_to_get_xla_figures(monkeypatch):
    monkeypatch.setattr(plan, "tpu_topology", lambda name: (None, "ModuleNotFoundError: libtpu"))
    devices, why = plan.aot_devices("v5p", 32)  # a TPU kind: the slice with 32 devices, v5p-64
    assert devices is None and "v5p-64" in why and "pip install libtpu==0.0.42.1" in why


def test_frozen_parts_are_counted_in_their_dtype():
    cfg = load_config("blip3o_8b")
    mesh = {"data": 16, "fsdp": 2, "tensor": 1}
    bf16 = plan.parameter_bytes(cfg, "generation", mesh)
    cfg.model.frozen_param_dtype = "float32"
    f32 = plan.parameter_bytes(cfg, "generation", mesh)
    frozen = sum(total - trainable for total, trainable in f32["counts"].values())
    assert frozen > 12e9  # Qwen2.5-VL-7B with its ViT, EVA-CLIP-E
    # Half of the frozen bytes go (every frozen tensor here divides over fsdp=2), the idle ones too (the
    # ViT and the LM head, which generation never reads: plan.IDLE_PARAMS).
    held = lambda p: p["params"] + p["idle"]
    assert held(f32) - held(bf16) == pytest.approx(frozen * 2 / 2, rel=1e-2)
    assert f32["grads"] == bf16["grads"] and f32["opt_state"] == bf16["opt_state"]
    # Understanding keeps model.param_dtype for its frozen parts (the trained generation head).
    assert plan.parameter_bytes(load_config("blip3o_8b"), "understanding", mesh)["params"] == \
        plan.parameter_bytes(cfg, "understanding", mesh)["params"]


@pytest.mark.parametrize("stage", ["generation", "understanding"])
def test_idle_parameters_are_those_the_step_never_reads(stage):
    """plan.IDLE_PARAMS against the stage loss's jaxpr: the frozen parameters no equation reads (jit
    prunes them from the compiled step, so XLA's figures leave them out)."""
    cfg = load_config("demo", "smoke")
    module, _ = plan.abstract_parameters(cfg)
    graphdef, trainable, frozen = nnx.split(module, model_lib.stage_trainable(cfg, stage), ...)
    shapes, grid = plan.batch_shapes(cfg, stage)
    batch = {k: jax.ShapeDtypeStruct(s, dt) for k, (s, dt) in shapes.items()}

    def loss(frozen, trainable, batch):
        return model_lib.stage_loss(nnx.merge(graphdef, trainable, frozen), stage, batch, jax.random.key(0), grid)[0]

    closed = jax.make_jaxpr(loss)(frozen, trainable, batch)
    read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
    paths = list(plan._paths(frozen))
    unread = {path for path, var in zip(paths, closed.jaxpr.invars[:len(paths)]) if id(var) not in read}
    idle = {path for path in paths if (path + "/").startswith(plan.IDLE_PARAMS[stage])}
    assert unread and unread == idle, (sorted(unread - idle)[:5], sorted(idle - unread)[:5])


def test_released_4b_dit_parameter_count():
    counts = plan.parameter_bytes(load_config("blip3o_4b"), "generation", {"data": 1, "fsdp": 1, "tensor": 1})["counts"]
    assert counts["gen_head"] == (DIT_PARAMS["blip3o_4b"],) * 2


@pytest.fixture(scope="module")
def demo():
    cfg = load_config("demo", "smoke")
    cfg.train.stage = "generation"
    cfg.data.global_batch_size = 8
    cfg.mesh.update(dict(data=2, fsdp=4, tensor=1))
    cfg.sharding.update(dict(llm="fsdp", vision="fsdp", dit="fsdp", target="fsdp"))
    return cfg


def shard_bytes_on(tree, device) -> int:
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def test_per_device_memory_matches_live_buffers(demo):
    cfg = demo
    mesh = sharding.make_mesh(cfg.mesh)
    model = model_lib.build_model(cfg, mesh)
    graphdef, trainable, frozen = nnx.split(model, model_lib.trainable_filter("generation"), ...)
    tx = optim.make_optimizer(cfg.train)
    with jax.set_mesh(mesh):  # the moments sharded like their parameters (train.py: see the report)
        opt_state = jax.jit(tx.init, out_shardings=optim.optimizer_shardings(tx, trainable, mesh))(trainable)
    b, length = cfg.data.global_batch_size, cfg.data.max_length
    rng = np.random.default_rng(0)
    host = {"input_ids": rng.integers(0, 1000, (b, length), dtype=np.int32),
            "attention_mask": np.ones((b, length), np.int32),
            "query_start": np.full((b,), length - cfg.model.n_query - 1, np.int32),
            "target_image": rng.standard_normal((b, cfg.data.image_size, cfg.data.image_size, 3)).astype(np.float32)}
    batch = sharding.shard_host_batch(host, mesh)

    def loss_fn(params, frozen_params, batch):
        return model_lib.stage_loss(nnx.merge(graphdef, params, frozen_params), "generation", batch,
                                    jax.random.key(0))[0]

    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(loss_fn), out_shardings=param_shardings)(trainable, frozen, batch)
    assert np.isfinite(float(optax.tree.norm(grads)))

    p = plan.make_plan(cfg, dict(data=2, fsdp=4, tensor=1), "cpu")
    d0 = jax.devices()[0]
    measured = {"params": shard_bytes_on((trainable, frozen), d0), "grads": shard_bytes_on(grads, d0),
                "opt_state": shard_bytes_on(opt_state, d0)}
    # The model holds every parameter, those the step reads and the idle ones (plan.IDLE_PARAMS).
    predicted = {"params": p.bytes_params + p.bytes_idle_params, "grads": p.bytes_grads,
                 "opt_state": p.bytes_opt_state}
    print("per-device bytes measured", measured, "predicted", predicted)
    for key in measured:
        assert abs(predicted[key] - measured[key]) <= 0.1 * measured[key], (key, predicted[key], measured[key])
    # The frozen parts make the parameters larger than the trainable part the gradients cover.
    assert measured["params"] > measured["grads"]
    assert measured["opt_state"] == pytest.approx(2 * measured["grads"], rel=0.01)


def test_activation_estimate_against_xla(demo):
    """XLA's temporary buffers of the compiled step against the planner's activations + gradients +
    temporaries (gathered weights, optimizer update): the same order of magnitude."""
    cfg = demo
    mesh = sharding.make_mesh(cfg.mesh)
    p = plan.make_plan(cfg, dict(data=2, fsdp=4, tensor=1), "cpu")
    xla = plan.compile_train_step(cfg, "generation", mesh)
    planned = p.bytes_activations + p.bytes_grads + p.bytes_temporaries
    print("XLA memory analysis", xla, "planned activations + grads + temporaries", planned)
    ratio = xla["temp_size_in_bytes"] / planned
    assert 0.5 < ratio < 2, ratio  # measured 1.33


def test_abstract_state_is_the_trainers_state(demo):
    """training.abstract_state (what the AOT compile feeds the step) against a real training.init_state."""
    cfg = demo
    mesh = sharding.make_mesh(cfg.mesh)
    model = model_lib.build_model(cfg, mesh)
    _, trainable, _ = nnx.split(model, model_lib.stage_trainable(cfg, "generation"), ...)
    tx = optim.make_optimizer(cfg.train)
    real = training.init_state(cfg, trainable, tx, mesh)
    abstract = training.abstract_state(cfg, trainable, tx, mesh)
    assert jax.tree.structure(real) == jax.tree.structure(abstract)
    for r, a in zip(jax.tree.leaves(real), jax.tree.leaves(abstract)):
        assert (r.shape, r.dtype) == (a.shape, a.dtype) and r.sharding.is_equivalent_to(a.sharding, r.ndim)


def test_frozen_bfloat16_towers_keep_a_tiny_runs_loss(tmp_path):
    """The trainer with frozen towers in bfloat16 (the generation default) against float32 ones, bfloat16
    compute in both: every matmul already rounds the frozen weights to bfloat16, so only the norm scales
    and biases applied in float32 differ (by bfloat16 rounding); the losses agree to well within it."""
    losses = {}
    for dtype in ("float32", "compute"):
        cfg = demo_config(**{"train.stage": "generation", "train.num_steps": 3, "train.log_every": 1,
                             "train.checkpoint_every": 100, "data.global_batch_size": 8, "model.dtype": "bfloat16",
                             "model.frozen_param_dtype": dtype})
        train_lib.train(cfg, str(tmp_path / dtype))
        with open(tmp_path / dtype / "metrics.jsonl") as f:
            losses[dtype] = np.array([json.loads(line)["loss"] for line in f if line.strip()])
        with ocp.StandardCheckpointer() as ckptr:  # the finished stage stores what it trained with
            meta = ckptr.metadata(str(tmp_path / dtype / "params" / "params")).item_metadata.tree
        stored = {str(leaf.dtype) for leaf in jax.tree.leaves(meta["backbone"])}
        assert stored == {"float32" if dtype == "float32" else "bfloat16"}, stored
    print("losses frozen float32", losses["float32"], "frozen bfloat16", losses["compute"])
    assert len(losses["compute"]) == 3
    # bfloat16's relative rounding is 2**-8; the frozen forward's rounding moves the loss far less.
    np.testing.assert_allclose(losses["compute"], losses["float32"], rtol=2**-8)
