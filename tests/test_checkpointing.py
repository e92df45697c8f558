"""Parameter checkpoints restore a subset (a checkpoint with the target encoder into a model built
without one) but refuse missing or mis-shaped keys; step FLOPs (and so the trainer's MFU) leave out the
target encoder when features are precomputed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blip3o_jax import flops, sharding
from blip3o_jax import checkpoints
from blip3o_jax.models import blip3o as model_lib
from blip3o_jax import train as train_lib
from blip3o_jax.data import synthetic
from blip3o_jax.weights import CheckpointMismatchError
from tests.references.configs import demo_config


def flat(tree):
    """{'backbone/model/...': leaf} of a nested dict (nnx.to_pure_dict form)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))
    return {"/".join(name(k) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def random_model(cfg, mesh, seed=0):
    """The config's Blip3o with random parameters placed straight into their shardings: unlike
    ``build_model`` nothing is compiled, which keeps these tests at a few seconds."""
    rng = np.random.default_rng(seed)
    graphdef, abstract = model_lib.abstract_model(cfg, mesh)
    state = jax.tree.map(lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding), abstract)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of the demo model with its EVA target encoder, and that model's parameters."""
    cfg = demo_config(**{"train.stage": "generation"})
    # One device: Orbax's first save of arrays on the 8-device mesh costs ~30 s of one-time work here.
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model = random_model(cfg, mesh)
    path = str(tmp_path_factory.mktemp("ckpt") / "with_eva")
    checkpoints.save_params(path, nnx.state(model))
    return {"path": path, "params": nnx.to_pure_dict(nnx.state(model)), "mesh": mesh, "model": model}


def test_checkpoint_with_target_encoder_loads_into_model_without_one(saved):
    cfg = demo_config(**{"train.stage": "generation", "model.target_encoder": "none"})
    model = random_model(cfg, saved["mesh"], seed=1)  # other values than the checkpoint's
    before = flat(nnx.to_pure_dict(nnx.state(model)))
    assert before and not any(k.startswith("target_encoder") for k in before)
    checkpoints.restore_into(model, saved["path"])
    after, stored = flat(nnx.to_pure_dict(nnx.state(model))), flat(saved["params"])
    assert after.keys() == before.keys() and len(stored) > len(after)
    for k, v in after.items():
        assert not np.array_equal(np.asarray(before[k]), np.asarray(stored[k])), k
        np.testing.assert_array_equal(np.asarray(v), np.asarray(stored[k]), err_msg=k)
        assert v.sharding == before[k].sharding, k


def test_missing_or_misshaped_keys_are_named(saved, tmp_path):
    broken = dict(saved["params"])
    del broken["target_encoder"]  # a checkpoint written by a model without the encoder
    broken["latent_queries"] = jax.tree.map(lambda x: jnp.zeros((1,) + x.shape, x.dtype), broken["latent_queries"])
    checkpoints.save_params(str(tmp_path), broken)
    with pytest.raises(CheckpointMismatchError) as err:
        checkpoints.restore_params(str(tmp_path), jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nnx.state(saved["model"])))
    missing = [k for k, _ in err.value.missing]
    assert missing and all(k.startswith("target_encoder/") for k in missing)
    assert set(missing) == {k for k in flat(saved["params"]) if k.startswith("target_encoder/")}
    assert [k for k, _, _ in err.value.mismatched] == [k for k in flat(saved["params"]) if k.startswith("latent_queries")]
    assert not err.value.unexpected
    assert missing[0] in str(err.value) and "latent_queries" in str(err.value)


def test_step_flops_leave_out_the_encoder_for_precomputed_features():
    cfg = demo_config(**{"train.stage": "generation"})
    with_encoder = model_lib.step_flops(cfg, "generation", 0)
    precomputed = model_lib.step_flops(cfg, "generation", 0, precomputed=True)
    _, abstract = model_lib.abstract_model(cfg, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    n_tokens = (cfg.model.eva.image_size // cfg.model.eva.patch_size) ** 2 + 1
    b, eva = cfg.data.global_batch_size, cfg.model.eva
    encoder = (flops.dense_flops(model_lib.param_count(abstract["target_encoder"]), b * n_tokens, "forward")
               + flops.attention_flops(eva.layers, n_tokens, eva.width, b, "forward"))
    assert encoder > 0
    np.testing.assert_allclose(with_encoder - precomputed, encoder, rtol=1e-12)
    none = demo_config(**{"train.stage": "generation", "model.target_encoder": "none"})
    assert model_lib.step_flops(none, "generation", 0) == precomputed


def test_trainer_counts_flops_for_precomputed_batches(tmp_path, monkeypatch):
    """train() tells step_flops whether the batches carry target features (zero steps: nothing compiles)."""
    cfg = demo_config(**{"train.stage": "generation", "model.target_encoder": "none", "data.global_batch_size": 8})
    feats = (cfg.model.dit.input_size ** 2, cfg.model.eva.width)
    rng = np.random.default_rng(0)
    records = [{"key": f"k{i}", "caption": "a red circle on the left", "meta": {},
                "target_features": rng.standard_normal(feats).astype(np.float32)} for i in range(8)]
    calls = []
    real = model_lib.step_flops
    monkeypatch.setattr(model_lib, "step_flops", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    monkeypatch.setattr(model_lib, "build_model", random_model)
    train_lib.train(cfg, str(tmp_path), tokenizer=synthetic.train_demo_tokenizer(), sources=[(records, 1.0)],
                    max_steps=0)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert (args[3:] + tuple(kwargs.values())) == (True,)
