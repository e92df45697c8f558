"""Small building blocks shared by every model file: annotated linear layers, remat policies, scanned
layer stacks and dtype helpers.

Parameter names mirror the PyTorch modules being ported (``kernel`` is a Linear ``weight`` transposed
to (in, out), ``scale`` a norm ``weight``) so each converter's mapping table stays mechanical.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

# Our parameters carry *logical* axis names; flax's eager sharding would read them as mesh axes.
# Placement is done explicitly by blip3o_jax.sharding (create_sharded / state_shardings) instead.
flax.config.update("flax_always_shard_variable", False)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Torch's nn.Linear default init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))) for kernels and
# biases, so models trained from scratch start like the PyTorch original (reference 5.7).
torch_linear_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def dtype_of(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def linear(
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    kernel_init: Callable | None = None,
) -> nnx.Linear:
    """nnx.Linear with logical axis names on its kernel (in, out) and bias (out,)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init or torch_linear_init, names),
        bias_init=nnx.with_partitioning(torch_bias_init(in_features), (names[1],)),
        rngs=rngs,
    )


def layer_norm(width: int, eps: float, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """Affine LayerNorm computed in float32 whatever the compute dtype (callers cast back)."""
    return nnx.LayerNorm(
        width,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Sequence[str | None], dtype=jnp.float32):
    """A bare nnx.Param with logical axis names."""
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names))


# ---------------------------------------------------------------------------------------------
# Remat policies (config key ``model.remat``), applied to the scanned block.

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; allowed: {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


# ---------------------------------------------------------------------------------------------
# Scanned layer stacks


def stack_layers(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """``num_layers`` blocks whose parameters are stacked along a leading 'layers' axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs: nnx.Rngs):
        return make_block(rngs)

    return create(rngs)


def scan_blocks(layers: nnx.Module, carry: Any, xs: Any = (), *, remat: str = "none",
                block_call: Callable[[nnx.Module, Any, Any], tuple[Any, Any]]) -> tuple[Any, Any]:
    """Runs stacked blocks in order: ``carry, y = block_call(block_i, carry, xs_i)``; returns (carry, ys).

    A plain ``jax.lax.scan`` over the split block state rather than ``nnx.scan``: the blocks hold no
    mutable state, and this keeps models usable when closed over inside other transforms (``jax.grad``
    with a frozen backbone as a constant, ``lax.while_loop`` decoding), where nnx.scan refuses
    variables created at an outer trace level. ``xs`` are per-layer inputs stacked on axis 0 (e.g. a
    KV cache). ``remat`` names a policy of REMAT_POLICIES, applied to one block.
    """
    graphdef, state = nnx.split(layers)

    def body(c, per_layer):
        layer_state, x = per_layer
        return block_call(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
    return jax.lax.scan(body, carry, (state, xs))


def scan_layers(
    layers: nnx.Module,
    x: jax.Array,
    *broadcast_args: Any,
    remat: str = "none",
    block_call: Callable[..., jax.Array] | None = None,
) -> jax.Array:
    """``x = block(x, *broadcast_args)`` for each stacked block in order (see scan_blocks).

    ``block_call(block, x, *args)`` overrides how one block is called (default ``block(x, *args)``).
    """
    call = block_call or (lambda block, h, *args: block(h, *args))
    out, _ = scan_blocks(layers, x, remat=remat, block_call=lambda block, h, _: (call(block, h, *broadcast_args), None))
    return out
