"""The training step and state, shared by the trainer (train.py) and the planner's AOT compile (plan.py),
so the program XLA checks ahead of time is the program that trains.

State (one Orbax item, donated to the step): ``params`` (trainable, float32 masters), ``opt_state``,
``step``, ``rng`` (raw key data), ``nonfinite`` (non-finite steps in a row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from blip3o_jax import optim
from blip3o_jax.models import blip3o as model_lib


def init_state(cfg, trainable, tx, mesh) -> dict:
    """The train state for ``trainable`` (already sharded on ``mesh``); optimizer moments born sharded."""
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=optim.optimizer_shardings(tx, trainable, mesh))(trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {
        "params": trainable,
        "opt_state": opt_state,
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(cfg.train.seed)), replicated),
        "nonfinite": jax.device_put(jnp.zeros((), jnp.int32), replicated),
    }


def make_train_step(cfg, stage: str, graphdef, tx, image_grid=None):
    """``train_step(state, frozen_params, batch) -> (state, metrics)``: gradient accumulation over
    ``train.grad_accum`` micro-batches (a scan), AdamW, and a skipped update when the loss or the
    gradient norm is not finite."""
    schedule = optim.learning_rate_schedule(cfg.train)

    def loss_fn(params, frozen_params, batch, rng):
        m = nnx.merge(graphdef, params, frozen_params)
        return model_lib.stage_loss(m, stage, batch, rng, image_grid)

    def train_step(state, frozen_params, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        accum = cfg.train.grad_accum
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def accumulate(carry, xs):
            grads_sum, loss_sum = carry
            i, mb = xs
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], frozen_params, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
        (grads, loss), aux = jax.lax.scan(accumulate, (zeros, 0.0), (jnp.arange(accum), micro))
        grads = jax.tree.map(lambda g: g / accum, grads)
        loss = loss / accum
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        # A non-finite loss or gradient skips the update (parameters and moments unchanged).
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
            "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1),
        }
        out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
        out.update(jax.tree.map(jnp.mean, aux))
        return new_state, out

    return train_step


def jit_train_step(train_step, state_shardings, frozen_shardings, mesh):
    """The step under jit with explicit shardings; the state is donated (updated in place)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, None),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
