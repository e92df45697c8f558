"""A real multi-process run: 2 JAX processes x 2 CPU devices on localhost (gloo collectives) train the
smoke demo's generation stage on a (data=2, fsdp=2) mesh through the trainer CLI.

Checked: each host reads its own rows of every global batch (no sample twice within the epoch, and the
global batches equal those of a one-process run), Orbax multi-process checkpoints, SIGKILL of both
processes after a checkpoint, resume with the same command, and the logged losses equal those of the
same run on 1 process x 4 devices to float32 rounding (rtol 1e-5; measured: the final loss is
identical, the largest difference over the 6 logged steps 1.6e-7 relative). The run validates every 3
steps on its own held-out files (train.eval_every, data.eval_paths): the validation losses of steps 3 and
6, step 3's computed again after the resume, equal the one-process run's to rtol 1e-5 as well.

Marked ``slow`` (130-150 s on 2 cores): both phases compile the trainer's programs in both processes,
without the persistent compilation cache (see ``launch``). CI runs it (``make test`` selects
everything); ``-m "not slow"`` skips it locally.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from blip3o_jax import distributed
from blip3o_jax import train as train_lib
from blip3o_jax.data import pipeline, sources, synthetic
from tests.references.configs import demo_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS, GLOBAL_BATCH, NUM_SAMPLES = 6, 8, 48  # exactly one epoch
BLOCK_AT_READ = 4  # phase 1 stops inside the 4th batch read: steps 1-3 done, checkpoint 2 written

# Runs the trainer CLI with the training DataIterator wrapped (the validation split's one-pass iterator
# is left alone): every host batch's sample keys and stream position go to $KEYLOG; with $BLOCK_AT_READ
# the process parks in that read until it is killed.
RUNNER = r'''
import json, os, threading
from blip3o_jax.data import pipeline

_next, _reads = pipeline.DataIterator.__next__, [0]

def logged_next(self):
    if self.num_epochs is not None:  # the validation split
        return _next(self)
    _reads[0] += 1
    if _reads[0] == int(os.environ.get("BLOCK_AT_READ", 0)):
        open(os.environ["KEYLOG"] + f".blocked{self.process_index}", "w").close()
        threading.Event().wait()  # until SIGKILL
    self.with_keys = True
    position = self._position
    batch = _next(self)
    with open(os.environ["KEYLOG"], "a") as f:
        f.write(json.dumps({"process": self.process_index, "count": self.process_count, "position": position,
                            "keys": batch.pop("key").tolist()}) + "\n")
    return batch

pipeline.DataIterator.__next__ = logged_next
from absl import app
from blip3o_jax import train
app.run(train.main)
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    shards = synthetic.write_synthetic_shards(str(root / "shards"), num_samples=NUM_SAMPLES, samples_per_shard=24)
    held_out = synthetic.write_synthetic_shards(str(root / "eval"), num_samples=2 * GLOBAL_BATCH, seed=1,
                                                samples_per_shard=GLOBAL_BATCH)
    synthetic.train_demo_tokenizer(str(root / "tokenizer"))
    (root / "runner.py").write_text(RUNNER)
    overrides = {"train.stage": "generation", "train.num_steps": NUM_STEPS, "train.log_every": 1,
                 "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "data.global_batch_size": GLOBAL_BATCH,
                 "data.paths": ",".join(shards), "data.tokenizer": str(root / "tokenizer"),
                 "data.source": "webdataset", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1,
                 "train.eval_every": 3, "data.eval_paths": ",".join(held_out)}
    return {"root": root, "shards": shards, "overrides": overrides}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setup, workdir, keylog, block_at=0):
    """The same trainer command on 2 processes, each with 2 CPU devices."""
    args = [sys.executable, str(setup["root"] / "runner.py"), "--config", "configs/demo.py:smoke",
            "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in setup["overrides"].items()]
    port = free_port()
    procs = []
    for i in range(2):
        # Backend optimisation level 0: ~20% faster compiles; the tiny steps do not mind slower code.
        flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   KEYLOG=str(keylog), BLOCK_AT_READ=str(block_at), PYTHONPATH=str(ROOT),
                   # Gloo gives up when a peer is >30 s late to a collective. JAX writes the persistent
                   # cache from process 0 only and process 1's cache keys differ, so with the cache
                   # process 0 would race ahead while process 1 compiles: both compile instead.
                   JAX_ENABLE_COMPILATION_CACHE="false")
        log = open(f"{keylog}.out{i}", "w")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def output(keylog, i):
    return pathlib.Path(f"{keylog}.out{i}").read_text()[-3000:]


def wait_until(predicate, procs, keylog, timeout=900):
    start = time.time()
    while not predicate():
        for i, p in enumerate(procs):
            if p.poll() is not None and not predicate():
                raise AssertionError(f"process {i} exited with {p.returncode}:\n{output(keylog, i)}")
        if time.time() - start > timeout:
            for p in procs:
                p.kill()
            raise AssertionError(f"timed out:\n{output(keylog, 0)}")
        time.sleep(0.2)


def checkpoints(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()) if d.exists() else []


def metric_rows(workdir):
    with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def reads(keylog):
    with open(keylog) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),  # one task: no coordinator
    ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, "tpu-gke"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu-multislice"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "explicit"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
])
def test_detect(monkeypatch, env, expected):
    for var in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.detect() == expected
    if expected is None:
        assert distributed.maybe_initialize() is False  # single process: never waits for a coordinator


@pytest.mark.slow
def test_two_processes_kill_resume_match_one_process(setup, tmp_path):
    workdir = tmp_path / "run"

    # Phase 1: train until the 4th batch read (checkpoint 2 on disk, step 3 done), then SIGKILL both.
    keylog1 = tmp_path / "keys1.jsonl"
    procs = launch(setup, workdir, keylog1, block_at=BLOCK_AT_READ)
    blocked = lambda: all(pathlib.Path(f"{keylog1}.blocked{i}").exists() for i in range(2))
    wait_until(lambda: blocked() and 2 in checkpoints(workdir), procs, keylog1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=60)
    assert max(checkpoints(workdir)) == 2
    assert [r["step"] for r in metric_rows(workdir)] == [1, 2, 3]

    # Phase 2: the same command resumes from step 2 and finishes.
    keylog2 = tmp_path / "keys2.jsonl"
    procs = launch(setup, workdir, keylog2)
    for i, p in enumerate(procs):
        assert p.wait(timeout=900) == 0, output(keylog2, i)
    rows = metric_rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, NUM_STEPS + 1))

    # Data: host i reads rows [4i, 4i+4) of each global batch of 8; positions count records x hosts.
    phase1, phase2 = reads(keylog1), reads(keylog2)
    assert all(r["count"] == 2 for r in phase1 + phase2)
    for i in range(2):
        assert [r["position"] for r in phase1 if r["process"] == i] == [0, 8, 16]
        # The batch read before the restore, then the restored position onwards.
        assert [r["position"] for r in phase2 if r["process"] == i] == [0, 16, 24, 32, 40]
    by_read = {}
    for r in phase1 + phase2:  # the same (host, position) always gives the same samples
        assert by_read.setdefault((r["process"], r["position"]), r["keys"]) == r["keys"]
    trained = [by_read[(i, 8 * t)] for t in range(NUM_STEPS) for i in range(2)]
    flat_keys = [k for batch in trained for k in batch]
    dataset_keys = {sources.WebDatasetSource(setup["shards"])[j]["key"] for j in range(NUM_SAMPLES)}
    assert len(flat_keys) == len(set(flat_keys)) == NUM_SAMPLES and set(flat_keys) == dataset_keys
    # ... and the global batches (host 0's rows, then host 1's) are those of a one-process run.
    key_of = lambda record: {"x": np.zeros((), np.int32), "key": record["key"]}
    one = pipeline.DataIterator([(sources.WebDatasetSource(setup["shards"]), 1.0)], key_of, batch_size=GLOBAL_BATCH,
                                seed=demo_config().data.seed, with_keys=True)
    for t in range(NUM_STEPS):
        assert list(next(one)["key"]) == by_read[(0, 8 * t)] + by_read[(1, 8 * t)]

    # The same run on 1 process x 4 devices: losses equal to float32 rounding.
    reference = tmp_path / "reference"
    train_lib.train(demo_config(**setup["overrides"]), str(reference), devices=jax.devices()[:4])
    ref = metric_rows(reference)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in ref], rtol=1e-5, err_msg=key)
    # The validation loss (steps 3 and 6; step 3 again after the resume) too.
    val_keys = [k for k in ref[-1] if k.startswith("val/")]
    assert len(val_keys) == 8 and [r["step"] for r in rows if "val/loss" in r] == [3, 6]
    for key in val_keys:
        np.testing.assert_allclose([r[key] for r in rows if key in r], [r[key] for r in ref if key in r], rtol=1e-5,
                                   err_msg=key)
