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
import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class PreemptionWatcher:
    """Turns SIGTERM into a flag the training loop polls at step boundaries (one process).

    With several processes the handler is left to JAX's preemption service (jax.distributed), which
    catches SIGTERM on any process and makes all of them stop at the same step
    (``RunCheckpointer.reached_preemption``); a per-process flag could stop them at different steps,
    and the one still stepping would wait forever in a collective.
    """

    def __init__(self):
        self._event = threading.Event()
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
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
    """Restores onto the shardings of ``abstract_params`` (an abstract nnx.State or a plain dict).

    The checkpoint may hold more than the target: e.g. one with the EVA target encoder restores into a
    model built with ``model.target_encoder='none'`` (training on precomputed features); only the target's
    keys are read. A key the target needs but the checkpoint lacks, or a shape that differs, raises
    ``weights.CheckpointMismatchError`` naming every such key.
    """
    from flax import nnx

    from blip3o_jax.weights import CheckpointMismatchError

    path = os.path.join(os.path.abspath(path), "params")
    state = abstract_params if isinstance(abstract_params, nnx.State) else None
    like = nnx.to_pure_dict(state) if state is not None else abstract_params
    # Orbax stores dict keys as strings; list-like NNX containers have integer keys.
    target = _string_keys(like)
    with ocp.StandardCheckpointer() as ckptr:
        stored = _flat_shapes(ckptr.metadata(path).item_metadata.tree)
    wanted = _flat_shapes(target)
    missing = [(k, shape) for k, shape in wanted.items() if k not in stored]
    mismatched = [(k, stored[k], shape) for k, shape in wanted.items() if k in stored and stored[k] != shape]
    if missing or mismatched:
        raise CheckpointMismatchError(missing, (), mismatched, where=path)
    if stored.keys() == wanted.keys():
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, target)
    else:
        logging.info("%s: restoring %d of %d stored arrays (the rest is not part of this model)", path,
                     len(wanted), len(stored))
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=args)
    restored = _keys_like(restored, like)
    if state is None:
        return restored
    nnx.replace_by_pure_dict(state, restored)
    return state


def _flat_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{'backbone/model/...': shape} of a nested dict of arrays, abstract arrays or Orbax metadata."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_shapes(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tuple(getattr(tree, "shape", ()))}


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _keys_like(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _keys_like(tree[str(k)], v) for k, v in like.items()}
    return tree
