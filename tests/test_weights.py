"""The streaming converter core: layouts, sharded safetensors, coverage errors, pickle refusal."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from blip3o_jax.models import layers as bnn
from blip3o_jax import sharding, weights


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = bnn.linear(6, 4, ("embed", "mlp"), rngs=rngs)
        self.conv = nnx.Conv(3, 4, (2, 2), kernel_init=nnx.with_partitioning(nnx.initializers.normal(), (None, None, "conv_in", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.queries = nnx.Param(jax.random.normal(rngs.params(), (1, 3, 6)), out_sharding=(None, None, "embed"))
        self.layers = bnn.stack_layers(Block, 4, rngs)


RULES = [
    weights.Rule("latent_queries", "queries"),
    weights.Rule("layers.{i}.fc.weight", "layers/fc/kernel", "linear"),
    weights.Rule("layers.{i}.fc.bias", "layers/fc/bias"),
    weights.Rule("layers.{i}.conv.weight", "layers/conv/kernel", "conv2d"),
    weights.Rule("layers.{i}.conv.bias", "layers/conv/bias"),
]


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_layout_transforms_roundtrip():
    x = np.random.rand(5, 3, 2, 4).astype(np.float32)
    y = weights.to_jax_layout(x, "conv2d")
    assert y.shape == (2, 4, 3, 5) and y[1, 2, 0, 4] == x[4, 0, 1, 2]
    np.testing.assert_array_equal(weights.to_torch_layout(y, "conv2d"), x)
    assert weights.torch_shape((7, 3), "linear") == (3, 7)
    assert weights.torch_shape((2, 14, 14, 3, 8), "conv3d") == (8, 3, 2, 14, 14)


@pytest.mark.parametrize("shard_bytes", [1 << 30, 300])
def test_export_then_load_roundtrip_into_shardings(tmp_path, mesh, shard_bytes):
    rules = sharding.rules_for("fsdp")
    src = Model(nnx.Rngs(0))
    weights.save_safetensors_sharded(weights.export_component(RULES, nnx.state(src), "model."), tmp_path, shard_bytes)
    files = os.listdir(tmp_path)
    if shard_bytes == 300:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    else:
        assert files == ["model.safetensors"]
    ckpt = weights.TorchCheckpoint(tmp_path)
    assert ckpt.shape("model.layers.2.fc.weight") == (4, 6)  # PyTorch layout on disk
    assert ckpt.shape("model.layers.0.conv.weight") == (4, 3, 2, 2)
    graphdef, abstract = sharding.abstract_with_shardings(lambda: Model(nnx.Rngs(1)), mesh, rules)
    state = weights.load_component(ckpt, RULES, abstract, prefix="model.")
    for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(nnx.state(src))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
    kernel = state["layers"]["fc"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_mismatch_lists_every_offender(tmp_path):
    src = Model(nnx.Rngs(0))
    tensors = dict(weights.export_component(RULES, nnx.state(src)))
    del tensors["layers.1.fc.weight"], tensors["layers.3.conv.bias"]
    tensors["layers.0.fc.bias"] = np.zeros((5,), np.float32)
    tensors["layers.0.extra.weight"] = np.zeros((2,), np.float32)
    tensors["vae.decoder.weight"] = np.zeros((2,), np.float32)
    weights.save_safetensors_sharded(tensors.items(), tmp_path)
    _, abstract = sharding.abstract_with_shardings(lambda: Model(nnx.Rngs(1)), sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}), ())
    with pytest.raises(weights.CheckpointMismatchError) as err:
        weights.load_component(weights.TorchCheckpoint(tmp_path), RULES, abstract, ignore=[r"vae\."])
    msg = str(err.value)
    for key in ("layers.1.fc.weight", "layers.3.conv.bias", "layers.0.extra.weight", "layers.0.fc.bias"):
        assert key in msg
    assert "vae.decoder" not in msg
    assert "checkpoint (5,) vs model (4,)" in msg
    assert len(err.value.missing) == 2 and len(err.value.unexpected) == 1 and len(err.value.mismatched) == 1


def test_rules_must_cover_the_model():
    state = nnx.state(Model(nnx.Rngs(0)))
    with pytest.raises(KeyError, match="without a mapping rule.*layers/conv/bias"):
        weights.expected_torch_keys(RULES[:-1], state)


def test_pickle_refused_unless_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.ones(2, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        weights.TorchCheckpoint(tmp_path)
    ckpt = weights.TorchCheckpoint(tmp_path, allow_pickle=True)
    np.testing.assert_array_equal(ckpt.get("w"), np.ones((2, 3), np.float32))


def test_bfloat16_tensors_upcast(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.5, -2.25], dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    x = weights.TorchCheckpoint(tmp_path).get("w")
    assert x.dtype == np.float32 and x.tolist() == [1.5, -2.25]
