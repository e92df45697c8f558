"""The trainer's EMA, validation loss and profiling (issue 21, section 3), through the trainer CLI.

One reference run (in-process) with all three on: EMA of the trained parameters, the validation loss on a
held-out split every 2 steps and a trace of step 2. The same command through the CLI is SIGKILLed
inside step 4 (checkpoint 2 on disk) and resumed: parameters, EMA weights and every metrics row
(validation included) equal the reference's exactly. The 1-vs-2-process agreement of the validation loss is checked in
tests/test_multihost.py (its run has validation on).
"""

import glob
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from blip3o_jax import checkpoints, configlib, convert, generate, optim, sharding, training
from blip3o_jax import train as train_lib
from blip3o_jax.data import pipeline, synthetic
from blip3o_jax.models import blip3o as model_lib
from tests.references.configs import demo_config
from tests.references.trainer_cli import ROOT, flat, latest_checkpoint, metric_rows, wait_for

NUM_STEPS, HOLDOUT, GLOBAL_BATCH = 4, 16, 8
BLOCK_AT_READ = 4  # the CLI run parks in its 4th training batch read (steps 1-3 done) until SIGKILL

# The trainer CLI with the training iterator's reads counted (the validation split's one-pass iterator
# is not): at read $BLOCK_AT_READ the process waits to be killed, so the kill lands at a known step.
RUNNER = r'''
import os, pathlib, threading
from blip3o_jax.data import pipeline

_next, _reads = pipeline.DataIterator.__next__, [0]

def counted_next(self):
    if self.num_epochs is None:
        _reads[0] += 1
        if _reads[0] == int(os.environ["BLOCK_AT_READ"]):
            pathlib.Path(os.environ["BLOCKED"]).touch()
            threading.Event().wait()
    return _next(self)

pipeline.DataIterator.__next__ = counted_next
from absl import app
from blip3o_jax import train
app.run(train.main)
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("features_data")
    shards = synthetic.write_synthetic_shards(str(root / "shards"), num_samples=64, samples_per_shard=32)
    synthetic.train_demo_tokenizer(str(root / "tokenizer"))
    return {"data.paths": ",".join(shards), "data.tokenizer": str(root / "tokenizer"), "data.source": "webdataset"}


def overrides(data, **extra):
    base = {"train.stage": "generation", "train.num_steps": NUM_STEPS, "train.log_every": 3,
            "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "data.global_batch_size": GLOBAL_BATCH,
            "train.ema_decay": 0.5, "train.eval_every": 2, "data.eval_holdout": HOLDOUT,
            "train.profile_steps": "2:2", **data}
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("features_reference")
    train_lib.train(demo_config(**overrides(data)), str(workdir))
    return workdir


def stored(workdir, name):
    with ocp.StandardCheckpointer() as ckptr:
        return flat(ckptr.restore(os.path.abspath(os.path.join(workdir, "params", name))))


def test_ema_and_validation_resume_exactly_after_sigkill(data, reference, tmp_path):
    workdir, blocked = tmp_path / "run", tmp_path / "blocked"
    (tmp_path / "runner.py").write_text(RUNNER)
    args = [sys.executable, str(tmp_path / "runner.py"), "--config", "configs/demo.py:smoke", "--workdir", str(workdir)]
    args += [f"--config.{k}={v}" for k, v in overrides(data).items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), BLOCK_AT_READ=str(BLOCK_AT_READ), BLOCKED=str(blocked))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: blocked.exists() and latest_checkpoint(workdir) == 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert [r["step"] for r in metric_rows(workdir)] == [2, 3]  # step 3 ran after the last checkpoint
    train_lib.train(demo_config(**overrides(data)), str(workdir))

    for name in ("params", "params_ema"):
        ref, got = stored(reference, name), stored(workdir, name)
        assert ref.keys() == got.keys() and ref
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}/{key}")
    rows, ref_rows = metric_rows(workdir), metric_rows(reference)
    assert rows == ref_rows
    # Every row has step and loss; rows 2 and 4 (eval_every 2, although log_every is 3) the validation.
    assert [r["step"] for r in rows] == [2, 3, 4] and all("loss" in r for r in rows)
    for r in rows:
        evaluated = r["step"] % 2 == 0
        for prefix in ("val", "val_ema"):
            names = [f"{prefix}/loss_t{t}" for t in training.EVAL_TIMESTEPS] + [f"{prefix}/loss"]
            assert all((n in r) == evaluated for n in names), r
        if evaluated:
            per_t = [r[f"val/loss_t{t}"] for t in training.EVAL_TIMESTEPS]
            assert np.all(np.isfinite(per_t)) and len(set(per_t)) == len(per_t)
            assert r["val/loss"] == pytest.approx(np.mean(per_t), rel=1e-12)
            assert r["val/loss"] != r["val_ema/loss"]

    # The EMA is part of the Orbax train state; the trained parameters and their average differ.
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.abspath(reference / "checkpoints" / str(NUM_STEPS) / "state"))
    assert flat(state["ema"]).keys() == flat(state["params"]).keys()
    ema, params = stored(reference, "params_ema"), stored(reference, "params")
    assert ema.keys() < params.keys() and all("gen_head" in k or "latent_queries" in k for k in ema)
    assert any(not np.array_equal(ema[k], params[k]) for k in ema)
    # TensorBoard has the validation scalars too.
    events = glob.glob(str(reference / "tensorboard" / "events.*"))
    assert events and any(b"val/loss_t125" in pathlib.Path(e).read_bytes() for e in events)


def test_profile_trace_of_the_requested_steps(reference):
    traces = glob.glob(str(reference / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_ema_weights_are_what_ema_loaders_pick(reference, tmp_path):
    mesh = sharding.make_mesh(demo_config().mesh, jax.devices()[:1])
    ema, params = stored(reference, "params_ema"), stored(reference, "params")
    for use_ema in (False, True):
        model, _ = checkpoints.load_model(reference, mesh=mesh, ema=use_ema)
        loaded = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        assert loaded.keys() == params.keys()
        for k in params:
            want = ema[k] if use_ema and k in ema else params[k]
            np.testing.assert_array_equal(loaded[k], want.astype(loaded[k].dtype), err_msg=k)
    # train.init_from + train.init_from_ema
    cfg = demo_config()
    model = model_lib.build_model(cfg, mesh)
    checkpoints.restore_into(model, reference, ema=True)
    loaded = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for k in ema:
        np.testing.assert_array_equal(loaded[k], ema[k], err_msg=k)

    # generate --ema samples from other weights than generate without it.
    feats = {}
    for flag in ("--ema", "--noema"):
        out = tmp_path / f"feats{flag}.npy"
        generate.main(["--checkpoint", str(reference), "--prompt", "a red circle", "--steps", "2", "--devices", "1",
                       "--features-out", str(out), flag])
        feats[flag] = np.load(out)
    assert not np.array_equal(feats["--ema"], feats["--noema"])

    # convert --to torch --ema exports the EMA weights of the trained parameters, the rest unchanged.
    from safetensors.numpy import load_file

    tensors = {}
    for flag in ("--ema", "--noema"):
        dst = tmp_path / f"torch{flag}"
        convert.main(["--src", str(reference), "--dst", str(dst), "--to", "torch", flag])
        tensors[flag] = {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    a, b = tensors["--ema"], tensors["--noema"]
    assert a.keys() == b.keys()
    differ = {k for k in a if not np.array_equal(a[k], b[k])}
    assert differ and all(k.startswith(("model.dit", "model.latent_queries")) for k in differ), sorted(differ)[:5]


def test_no_ema_means_no_ema_in_the_state_and_checkpoint_errors(data, tmp_path):
    mesh = sharding.make_mesh(demo_config().mesh, jax.devices()[:1])
    for decay in (0.0, 0.9):
        cfg = demo_config(**overrides(data, **{"train.ema_decay": decay}))
        model = model_lib.build_model(cfg, mesh)
        _, trainable, _ = nnx.split(model, model_lib.stage_trainable(cfg, "generation"), ...)
        tx = optim.make_optimizer(cfg.train)
        state = training.init_state(cfg, trainable, tx, mesh)
        abstract = training.abstract_state(cfg, trainable, tx, mesh)
        assert ("ema" in state) == ("ema" in abstract) == (decay > 0)
        # plan.py compiles against abstract_state: the same tree, shapes, dtypes and shardings.
        described = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state)
        assert described == jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), abstract)
    # EMA buffers are copies, not the parameters' (the state is donated to the step).
    assert all(e.unsafe_buffer_pointer() != p.unsafe_buffer_pointer()
               for e, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"])))
    with pytest.raises(checkpoints.CheckpointError, match="params_ema"):
        checkpoints.restore_into(model, _params_only_checkpoint(model, cfg, tmp_path), ema=True)


def _params_only_checkpoint(model, cfg, tmp_path):
    path = str(tmp_path / "plain")
    checkpoints.save_model(path, model, cfg)
    return path


def test_ema_update_is_the_moving_average():
    ema, params = {"w": np.float32([1.0, 2.0])}, {"w": np.float32([3.0, 6.0])}
    np.testing.assert_allclose(optim.ema_update(ema, params, 0.75)["w"], [1.5, 3.0], rtol=0)


def test_holdout_records_are_never_trained_on(data):
    cfg = demo_config(**overrides(data))
    keys = lambda it: [k for b in it for k in b["key"]]
    train_it = pipeline.make_iterator(cfg, None, "generation", num_epochs=1, process_index=0, process_count=1)
    eval_it = pipeline.make_eval_iterator(cfg, None, process_index=0, process_count=1)
    for it in (train_it, eval_it):  # keys only: the transform needs a tokenizer the test does not load
        it.transform, it.with_keys = (lambda r: {"x": np.zeros((), np.int32), "key": r["key"]}), True
    trained, held_out = keys(train_it), keys(eval_it)
    assert len(trained) == 64 - HOLDOUT and len(held_out) == HOLDOUT and not set(trained) & set(held_out)
    eval_it.set_state({"position": 0})  # rewound (what Validator does): the same batches again
    assert keys(eval_it) == held_out


@pytest.mark.parametrize("key, value, message", [
    ("train.ema_decay", 1.0, "train.ema_decay"),
    ("train.eval_every", 5, "train.eval_every"),  # without a validation split
    ("train.profile_steps", "3", "train.profile_steps"),
    ("train.profile_steps", "4:2", "train.profile_steps"),
    ("train.init_from_ema", True, "train.init_from_ema"),
])
def test_bad_values_name_the_key(key, value, message):
    cfg = demo_config(**{"train.stage": "generation", key: value})
    with pytest.raises(configlib.ConfigError, match=message.replace(".", r"\.")):
        configlib.validate(cfg)

