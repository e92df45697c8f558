"""A tiny training loop shared by the head tests (tests/test_heads.py, tests/test_mixer_denoiser.py)."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def train_fixed_batch(head, loss_fn, steps: int, lr: float) -> list[float]:
    """Adam on ``loss_fn(head)``, one jitted step; returns every step's loss."""
    graphdef, params = nnx.split(head, nnx.Param)
    opt = optax.adam(lr)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = opt.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    nnx.update(head, params)
    return losses
