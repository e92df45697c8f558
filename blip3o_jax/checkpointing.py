"""Orbax checkpoints of a training run: trainable parameters, optimizer state, step and RNG (one
pytree), the data-iterator state and the config (JSON), saved asynchronously every
``checkpoint_every`` steps, keeping the newest ``keep_checkpoints``.

A SIGTERM (or JAX's preemption notice on TPU/GPU clusters) makes the run save at the next step
boundary and exit cleanly; restarting the same command resumes from the newest checkpoint. Restores go
through abstract arrays that carry the *current* run's shardings, so a checkpoint written on one mesh
restores onto any other.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class PreemptionWatcher:
    """Turns SIGTERM into a flag the training loop polls at step boundaries."""

    def __init__(self):
        self._event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def requested(self) -> bool:
        return self._event.is_set()


class RunCheckpointer:
    def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by ``abstract_state`` (jax.ShapeDtypeStruct leaves)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params: Any, config: dict | None = None) -> None:
    """A standalone parameter checkpoint (the output of ``blip3o_jax.convert`` and of a finished stage):
    ``path/params`` holds the model's parameters as a plain nested dict (``backbone/model/...``)."""
    from flax import nnx

    path = os.path.abspath(path)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), params, force=True)
    if config is not None and jax.process_index() == 0:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=1)


def restore_params(path: str, abstract_params: Any) -> Any:
    """Restores onto the shardings of ``abstract_params`` (an abstract nnx.State or a plain dict)."""
    from flax import nnx

    path = os.path.abspath(path)
    state = abstract_params if isinstance(abstract_params, nnx.State) else None
    target = nnx.to_pure_dict(state) if state is not None else abstract_params
    with ocp.StandardCheckpointer() as ckptr:
        # Orbax stores dict keys as strings; list-like NNX containers have integer keys.
        restored = _keys_like(ckptr.restore(os.path.join(path, "params"), _string_keys(target)), target)
    if state is None:
        return restored
    nnx.replace_by_pure_dict(state, restored)
    return state


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _keys_like(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _keys_like(tree[str(k)], v) for k, v in like.items()}
    return tree
