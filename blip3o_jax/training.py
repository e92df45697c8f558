"""The training step and state, shared by the trainer (train.py) and the planner's AOT compile (plan.py),
so the program XLA checks ahead of time is the program that trains.

State (one Orbax item, donated to the step): ``params`` (trainable, float32 masters), ``opt_state``,
``step``, ``rng`` (raw key data), ``nonfinite`` (non-finite steps in a row) and, only with
``train.ema_decay`` > 0, ``ema`` (the trainable parameters' moving average, float32, sharded like
``params``; with the decay at 0 the state and every number are those of a run without the feature).
``abstract_state`` gives the same structure as sharded ShapeDtypeStructs: plan.py compiles the step
against it and a resume restores onto it.

Also here: the validation loss of ``train.eval_every`` (``make_eval_step`` / ``Validator``) and the
``train.profile_steps`` trace (``Profiler``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from blip3o_jax import configlib, optim, sharding
from blip3o_jax.models import blip3o as model_lib

# Validation timesteps (the head's t = 1000 sigma, sigma = t / flow.num_train_timesteps, whatever
# flow.shift is): the clean end, the middle and the noisy end of the path; the mean over them is val/loss.
EVAL_TIMESTEPS = (125, 250, 375, 500, 625, 750, 875)
EVAL_SEED = 0  # the validation noise of batch i is normal(fold_in(key(EVAL_SEED), i)): fixed for every run


def abstract_state(cfg, trainable, tx, mesh) -> dict:
    """The train state of ``init_state(cfg, trainable, tx, mesh)`` as ShapeDtypeStructs with shardings
    (``trainable``: sharded arrays or ShapeDtypeStructs). plan.py AOT-compiles the step against it; a
    resume restores onto it. Holds ``ema`` exactly when ``cfg.train.ema_decay`` > 0."""
    sds = lambda x, sharding=None: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding)
    params = jax.tree.map(sds, trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {
        "params": params,
        "opt_state": jax.tree.map(sds, jax.eval_shape(tx.init, params), optim.optimizer_shardings(tx, params, mesh)),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "rng": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
        "nonfinite": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    }
    if cfg.train.ema_decay > 0:
        state["ema"] = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding), params)
    return state


def init_state(cfg, trainable, tx, mesh) -> dict:
    """The train state for ``trainable`` (already sharded on ``mesh``); optimizer moments born sharded."""
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=optim.optimizer_shardings(tx, trainable, mesh))(trainable)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {
        "params": trainable,
        "opt_state": opt_state,
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(cfg.train.seed)), replicated),
        "nonfinite": jax.device_put(jnp.zeros((), jnp.int32), replicated),
    }
    if cfg.train.ema_decay > 0:  # starts at the initial parameters, in its own buffers (the state is donated)
        copy = lambda params: jax.tree.map(lambda p: jnp.copy(p.astype(jnp.float32)), params)
        with jax.set_mesh(mesh):
            state["ema"] = jax.jit(copy, out_shardings=jax.tree.map(lambda p: p.sharding, trainable))(trainable)
    return state


def make_train_step(cfg, stage: str, graphdef, tx, image_grid=None):
    """``train_step(state, frozen_params, batch) -> (state, metrics)``: gradient accumulation over
    ``train.grad_accum`` micro-batches (a scan), AdamW, the EMA when the state has one, and a skipped
    update (parameters, moments and EMA unchanged) when the loss or the gradient norm is not finite."""
    schedule = optim.learning_rate_schedule(cfg.train)
    ema_decay = float(cfg.train.ema_decay)

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
        if "ema" in state:
            new_state["ema"] = keep(optim.ema_update(state["ema"], new_params, ema_decay), state["ema"])
        out = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite}
        out.update(jax.tree.map(jnp.mean, aux))
        return new_state, out

    return train_step


def jit_train_step(train_step, state_shardings, frozen_shardings, mesh):
    """The step under jit with explicit shardings; the state is donated (updated in place)."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, None),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Validation (train.eval_every)


def make_eval_step(cfg, graphdef, timesteps: Iterable[int] = EVAL_TIMESTEPS):
    """``eval_step(params, frozen_params, batch, index) -> (T,)``: the generation head's loss at each of
    ``timesteps`` on ``batch``, every condition kept and one noise draw fixed by the batch ``index``
    (models/blip3o.py validation_losses). A pure function of (parameters, batch, index): no training
    randomness, so it is identical across resumes and, to float32 rounding, across host counts."""
    sigmas = np.asarray(tuple(timesteps), np.float32) / np.float32(cfg.flow.num_train_timesteps)

    def eval_step(params, frozen_params, batch, index):
        model = nnx.merge(graphdef, params, frozen_params)
        key = jax.random.fold_in(jax.random.key(EVAL_SEED), index)
        return model.validation_losses(batch, jnp.asarray(sigmas), key)

    return eval_step


class Validator:
    """Runs ``make_eval_step`` over every global batch of the validation split (``batches``: this host's
    rows of them, pipeline.make_eval_iterator, rewound to its start for each validation) and returns the
    metrics of that step's row:
    ``val/loss_tT`` per timestep and ``val/loss`` (their mean), and the same as ``val_ema/...`` for the
    EMA weights when the state has them. Batch means are averaged on the host in float64."""

    def __init__(self, cfg, graphdef, params_shardings, frozen_shardings, mesh,
                 batches, timesteps: Iterable[int] = EVAL_TIMESTEPS):
        self.cfg, self.mesh, self.batches = cfg, mesh, batches
        self.start = batches.get_state()  # before any read: where every validation starts
        self.every = int(cfg.train.eval_every)
        self.timesteps = tuple(timesteps)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.step_fn = jax.jit(make_eval_step(cfg, graphdef, self.timesteps),
                               in_shardings=(params_shardings, frozen_shardings, None, None), out_shardings=replicated)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, state: dict, frozen) -> dict[str, float]:
        weights = {"val": state["params"]}
        if "ema" in state:
            weights["val_ema"] = state["ema"]
        sums = {name: np.zeros(len(self.timesteps), np.float64) for name in weights}
        count = 0
        with jax.set_mesh(self.mesh):
            self.batches.set_state(self.start)
            for host in self.batches:
                batch = sharding.shard_host_batch(model_lib.prepare_batch(host, self.cfg, "a validation batch")[0],
                                                  self.mesh)
                for name, params in weights.items():
                    sums[name] += np.asarray(jax.device_get(self.step_fn(params, frozen, batch, np.int32(count))),
                                             np.float64)
                count += 1
        if count == 0:
            raise ValueError("the validation split (data.eval_paths / data.eval_holdout) holds no full global batch "
                             f"of data.global_batch_size {self.cfg.data.global_batch_size}")
        out = {}
        for name, total in sums.items():
            losses = total / count
            out.update({f"{name}/loss_t{t}": float(v) for t, v in zip(self.timesteps, losses)})
            out[f"{name}/loss"] = float(losses.mean())
        return out


# ---------------------------------------------------------------------------------------------
# Profiling (train.profile_steps)


class Profiler:
    """A ``jax.profiler`` trace of steps START..END (``train.profile_steps``, numbered as in metrics.jsonl)
    into ``WORKDIR/profile`` (TensorBoard's profile plugin / xprof read it), on process 0 unless
    ``train.profile_all_hosts``. A run resumed inside the range traces the rest of it."""

    def __init__(self, cfg, workdir: str):
        steps = configlib.profile_steps(cfg)
        on_this_host = cfg.train.profile_all_hosts or jax.process_index() == 0
        self.start, self.end = steps if steps is not None and on_this_host else (None, None)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before_step(self, step: int) -> None:
        """``step``: the number of the step about to run (1 for the first)."""
        if self.start is not None and not self.active and self.start <= step <= self.end:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, state) -> None:
        if self.active and step >= self.end:
            self.stop(state)

    def stop(self, state=None) -> None:
        if not self.active:
            return
        if state is not None:
            jax.block_until_ready(state)  # the traced steps' device work ends inside the trace
        jax.profiler.stop_trace()
        self.active, self.start = False, None
        logging.info("profile of steps up to %d written to %s", self.end, self.directory)
