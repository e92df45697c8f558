"""Mesh construction, rule tables, born-sharded parameters, batch placement and a jitted update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from blip3o_jax.models import layers as bnn
from blip3o_jax import sharding


class Block(nnx.Module):
    def __init__(self, d, f, rngs):
        self.fc1 = bnn.linear(d, f, ("embed", "mlp"), rngs=rngs)
        self.fc2 = bnn.linear(f, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class Tiny(nnx.Module):
    def __init__(self, rngs, vocab=32, d=16, f=32, n=3):
        self.embed = nnx.Embed(vocab, d, embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")), rngs=rngs)
        self.norm = nnx.Param(jnp.ones((d,)), out_sharding=("norm",))
        self.layers = bnn.stack_layers(lambda r: Block(d, f, r), n, rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = bnn.scan_layers(self.layers, h, remat="full")
        return h * self.norm[...]


def test_mesh_axes_and_minus_one():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
    with pytest.raises(ValueError, match="unknown sharding rule table"):
        sharding.rules_for("zero9")


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = sharding.rules_for("fsdp")
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")
    assert sharding.logical_to_spec(("heads", "kv"), rules) == P("tensor", None)  # tensor already used
    assert sharding.logical_to_spec(("batch", None), rules) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("norm",), sharding.rules_for("replicated")) == P(None)


@pytest.mark.parametrize("table", ["fsdp", "tensor", "replicated"])
def test_born_sharded_params_and_jitted_update(table):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.rules_for(table)
    model = sharding.create_sharded(lambda: Tiny(nnx.Rngs(0)), mesh, rules)
    graphdef, params = nnx.split(model)
    # Every parameter's placement is exactly what its logical names give under the rule table.
    for path, var in nnx.to_flat_state(params):
        names = var.get_metadata()["out_sharding"]
        expected = sharding.logical_to_spec(names, rules)
        assert var[...].sharding.spec == expected, (path, names)
    assert params["layers"]["fc1"]["kernel"][...].shape == (3, 16, 32)
    if table == "fsdp":
        assert params["layers"]["fc1"]["kernel"][...].sharding.spec == P(None, "fsdp", "tensor")
        assert params["embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")

    shardings = sharding.state_shardings(params, mesh, rules)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    batch = sharding.shard_host_batch({"ids": np.arange(8 * 5).reshape(8, 5) % 32}, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"), None)

    def loss_fn(p, ids):
        return jnp.mean(nnx.merge(graphdef, p)(ids) ** 2)

    @functools.partial(jax.jit, out_shardings=(shardings, None, None), donate_argnums=(0, 1))
    def update(p, s, ids):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    with jax.set_mesh(mesh):
        loss0 = loss_fn(params, batch["ids"])
        new_params, opt_state, loss = update(params, opt_state, batch["ids"])
        new_params, opt_state, loss2 = update(new_params, opt_state, batch["ids"])
    assert np.isclose(loss, loss0) and loss2 < loss
    for (path, var), (_, sh) in zip(nnx.to_flat_state(new_params), nnx.to_flat_state(shardings)):
        assert var[...].sharding.spec == sh.spec, path


def test_sharded_matches_single_device():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = sharding.create_sharded(lambda: Tiny(nnx.Rngs(0)), mesh, sharding.rules_for("fsdp"))
    single = Tiny(nnx.Rngs(0))
    ids = np.arange(40).reshape(8, 5) % 32
    with jax.set_mesh(mesh):
        out = jax.jit(lambda m, x: m(x))(sharded, sharding.shard_host_batch({"x": ids}, mesh)["x"])
    np.testing.assert_allclose(np.asarray(out), np.asarray(single(ids)), rtol=1e-6, atol=1e-6)

