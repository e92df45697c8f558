"""Driving the trainer CLI from tests: a subprocess per run, its metrics rows and checkpoints read back
(shared by tests/test_train.py, tests/test_train_features.py and tests/test_train_samples.py)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[2]
# Fields that depend on wall time; everything else must be identical after a resume.
TIMING = {"step_time", "images_per_s", "mfu"}


def cli(workdir, overrides):
    args = [sys.executable, "-m", "blip3o_jax.train", "--config", "configs/demo.py:smoke", "--workdir", str(workdir)]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def metric_rows(workdir):
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f if line.strip()]


def flat(tree):
    """{'backbone/model/...': array}; integer and string keys alike (Orbax restores ints as strings)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))
    return {"/".join(name(k) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def final_params(workdir):
    with ocp.StandardCheckpointer() as ckptr:
        return flat(ckptr.restore(os.path.abspath(os.path.join(workdir, "params", "params"))))


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for training progress")
        time.sleep(0.2)


def latest_checkpoint(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in d.glob("*") if p.name.isdigit()] if d.exists() else []
    return max(steps, default=None)
