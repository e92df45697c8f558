"""Small building blocks shared by every model file: annotated linear layers, the RMSNorm and LayerNorm
every model uses, remat policies, scanned layer stacks and dtype helpers.

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
# biases, so models trained from scratch start like the PyTorch original (docs/model.md 5.7).
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


# ---------------------------------------------------------------------------------------------
# Norms: statistics always in float32; ``cast_before_scale`` picks where the result is rounded to
# the input dtype, the one place the PyTorch references differ (visible in bfloat16 only: in
# float32 both orders are the same arithmetic). tests/test_bfloat16.py measures each choice.


def _norm_param(rngs: nnx.Rngs | None, init: Callable, dim: int, param_dtype):
    # With rngs, one key is drawn per parameter, as nnx.LayerNorm and the UNet's norms always did:
    # the models built with it keep their from-scratch initialisation (the RNG stream) unchanged.
    value = init(rngs.params() if rngs is not None else None, (dim,), param_dtype)
    return nnx.Param(value, out_sharding=("norm",))


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * scale (torch ``weight``), statistics in float32, output in x's dtype.

    ``cast_before_scale=True`` (default) rounds the normalised x to x's dtype and multiplies by the
    scale in that dtype: transformers' Qwen2RMSNorm / Qwen2_5_VLRMSNorm
    (``weight * hidden.to(input_dtype)``) and diffusers' RMSNorm with half-precision weights
    (``hidden.to(weight.dtype) * weight``), i.e. every RMSNorm of BLIP3-o's references.
    ``False`` multiplies in float32 and rounds once.
    """

    def __init__(self, dim: int, eps: float, *, cast_before_scale: bool = True, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps, self.cast_before_scale = eps, cast_before_scale
        self.scale = _norm_param(rngs, nnx.initializers.ones_init(), dim, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.cast_before_scale:
            return self.scale[...].astype(x.dtype) * y.astype(x.dtype)
        return (self.scale[...].astype(jnp.float32) * y).astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis: two-pass mean/variance in float32, output in x's dtype.

    ``cast_before_scale=False`` (default) applies scale and bias in float32 and rounds once, as
    torch's LayerNorm kernel does for half inputs (diffusers' LayerNorm is torch's on torch >= 2.1);
    ``True`` rounds the normalised x first. ``affine=False`` has no parameters (torch
    ``elementwise_affine=False``). ``fast_variance``: flax's one-pass statistics instead (see ``_fast``).
    """

    def __init__(self, dim: int, eps: float, *, affine: bool = True, cast_before_scale: bool = False,
                 fast_variance: bool = False, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.eps, self.affine, self.cast_before_scale = eps, affine, cast_before_scale
        self.fast_variance = fast_variance
        if affine:
            self.scale = _norm_param(rngs, nnx.initializers.ones_init(), dim, param_dtype)
            self.bias = _norm_param(rngs, nnx.initializers.zeros_init(), dim, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        if self.fast_variance and self.affine and not self.cast_before_scale:
            return self._fast(x32, mean).astype(x.dtype)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if not self.affine:
            return y.astype(x.dtype)
        if self.cast_before_scale:
            dt = x.dtype
            return y.astype(dt) * self.scale[...].astype(dt) + self.bias[...].astype(dt)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)

    def _fast(self, x32: jax.Array, mean: jax.Array) -> jax.Array:
        # flax's LayerNorm arithmetic (Var = E[x^2] - E[x]^2, scale folded into the rsqrt), which the EVA and
        # SigLIP2 ports used before this class existed: kept bit for bit so models trained with it (the
        # demo) reproduce. Both formulas agree with torch's to float32 rounding (the parity tests).
        var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean))
        mul = jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return (x32 - mean) * mul + self.bias[...].astype(jnp.float32)


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
