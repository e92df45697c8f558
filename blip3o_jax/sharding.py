"""Mesh, logical-axis rule tables and the helpers that place parameters and batches on a mesh.

Every parameter is annotated with *logical* axis names (MaxText style) through the variable metadata
``out_sharding``, e.g. ``nnx.with_partitioning(init, ("embed", "mlp"))``; scanned layer stacks get the
extra leading ``"layers"`` axis from ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
"layers"})``. A *rule table* maps logical names to mesh axes (``data``, ``fsdp``, ``tensor``). Each
model component (backbone, vision tower, DiT head, target encoder) picks its table by name in the
config (``config.sharding``), so e.g. a frozen backbone can be sharded differently from the trained head.

Parameters are born sharded: the module is traced abstractly, shardings are derived from the metadata
and the rule table, and the real initialisation runs under ``jax.jit`` with those ``out_shardings``.
Flax's eager sharding (sharding each variable as it is created, which needs a mesh context and
mesh-axis names instead of logical ones) is switched off for that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis names used by the models.
#   parameters: embed (model width), mlp (FFN hidden), heads (q heads x head_dim, fused qkv outputs),
#               kv (k/v heads x head_dim), vocab, layers (scan axis), conv_in (patch/conv inputs),
#               norm (1-D scales and biases), queries (learned query tokens), channels (target tokens)
#   activations: batch, length, act_embed, act_heads, act_mlp
Rules = tuple[tuple[str, Any], ...]

_BATCH = ("batch", ("data", "fsdp"))

RULE_TABLES: dict[str, Rules] = {
    # Parameters fully replicated; only the batch is split. Right for tiny models and for CPU tests.
    "replicated": (_BATCH,),
    # ZeRO-3 style: every large matrix split over fsdp along its model-width axis; tensor parallel
    # along heads / FFN hidden / vocab when the tensor axis is > 1.
    "fsdp": (
        _BATCH,
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", "tensor"),
        ("vocab", "tensor"),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
    ),
    # Pure tensor parallelism (inference on a few chips): weights split over tensor only.
    "tensor": (
        _BATCH,
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv", "tensor"),
        ("vocab", "tensor"),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
    ),
}


def rules_for(name: str) -> Rules:
    if name not in RULE_TABLES:
        raise ValueError(f"unknown sharding rule table {name!r}; allowed: {sorted(RULE_TABLES)}")
    return RULE_TABLES[name]


# ---------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for (data, fsdp, tensor); one entry may be -1 meaning 'the remaining devices'."""
    sizes = [int(axes[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{a}={s}: must be a positive integer or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are available; set one axis to -1 to use the rest"
        )
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation inside jit)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = resolve_mesh_shape(axes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec / NamedSharding


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> P:
    """PartitionSpec for an array whose dimensions carry these logical names.

    A name without a rule (or None) is replicated; a mesh axis is used at most once per array (the
    first dimension that claims it wins), as in flax.linen.logical_to_mesh_axes.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names or ():
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if not axes or any(a in used for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


# A rule table, or a function choosing one from a parameter's path (one table per model component).
RulesOrChooser = Rules | Callable[[tuple], Rules]


def _var_spec(path: tuple, var: Any, rules: RulesOrChooser) -> P:
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    table = rules(tuple(getattr(k, "key", k) for k in path)) if callable(rules) else rules
    return logical_to_spec(names, table)


def state_specs(state: Any, rules: RulesOrChooser) -> Any:
    """PartitionSpec tree (same structure as ``state``) from the variables' logical-axis metadata."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: _var_spec(path, v, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def state_shardings(state: Any, mesh: Mesh, rules: RulesOrChooser) -> Any:
    specs = state_specs(state, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def place_on_mesh(tree: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(tree placed on ``mesh``, its NamedShardings): leaves already NamedSharded on ``mesh`` keep their
    sharding, every other leaf (e.g. an optimizer's step count, a small head built outside a mesh) is
    replicated. Passing the shardings to ``jax.jit`` as in/out shardings keeps a training loop to one
    compilation (otherwise the first step's uncommitted inputs and later committed ones differ)."""
    replicated = NamedSharding(mesh, P())
    keep = lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) \
        and x.sharding.mesh == mesh else replicated
    shardings = jax.tree.map(keep, tree)
    return jax.device_put(tree, shardings), shardings


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh or without rules."""
    if rules is None or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules: RulesOrChooser) -> nnx.Module:
    """Builds ``factory()`` with every parameter born sharded (never materialised on one device)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.state(factory())

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def abstract_with_shardings(factory: Callable[[], nnx.Module], mesh: Mesh, rules: RulesOrChooser):
    """(graphdef, state of ShapeDtypeStructs carrying their target NamedShardings): no allocation."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    abstract_state = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
        abstract_state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return graphdef, abstract_state


# ---------------------------------------------------------------------------------------------
# Host batches -> global arrays


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = (_BATCH,)) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def shard_host_batch(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules = (_BATCH,)) -> dict:
    """Each process passes its own slice of the global batch (leading axis); returns global arrays.

    With one process this is simply a device_put split along the batch axis; with several, the
    global batch is the concatenation of the processes' slices in process order.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim, rules)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
