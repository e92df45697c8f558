"""Optimizer and learning-rate schedule of the BLIP3-o recipe (docs/model.md 11).

AdamW with linear warmup over ``warmup_ratio`` of the steps, then cosine decay to ``min_learning_rate``
(stage 1, ``cosine_with_min_lr``), to 0 (stage 2, ``cosine``) or constant; gradient clipping by global
norm (the PyTorch original diverges without it). As in the Hugging Face Trainer, weight decay skips
biases and norm scales (parameters with fewer than two dimensions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    total = int(train_cfg.num_steps)
    warmup = int(round(train_cfg.warmup_ratio * total))
    peak, floor = float(train_cfg.learning_rate), float(train_cfg.min_learning_rate)
    if train_cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        end = floor if train_cfg.schedule == "cosine_with_min_lr" else 0.0
        decay = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=end / peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(train_cfg)
    decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            schedule,
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
            mask=decay_mask,
        ),
    )


def optimizer_shardings(tx, params, mesh):
    """Shardings for ``tx.init(params)``: every per-parameter moment like its parameter, scalars (step
    counts) replicated. Pass them as ``out_shardings`` of the jitted ``tx.init``: without them XLA has
    nothing to propagate from (zeros do not depend on the parameters) and replicates the moments."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                 jax.tree.map(lambda x: x.sharding, params),
                                 transform_non_params=lambda _: replicated)


def ema_update(ema, params, decay: float):
    """One step of the parameters' exponential moving average: ``decay * ema + (1 - decay) * params``,
    in the EMA's dtype (float32, like the master weights). No bias correction: the average starts at the
    initial parameters (train.ema_decay; training.py applies it only when a step's update is applied)."""
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)
