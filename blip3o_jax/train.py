"""Trains BLIP3-o: ``python -m blip3o_jax.train --config configs/NAME.py[:ARG] --workdir DIR``.

Re-running the same command in the same workdir resumes from the newest checkpoint. Read top to
bottom: mesh -> data -> model -> shardings -> jitted step -> resume -> loop. Stages (config.train.stage):

  understanding  causal-LM loss on image-text / question-answer data, backbone trainable
  generation     backbone frozen; queries + generation head trained (flow matching or MSE)
  instruction    same objective as generation, from a generation checkpoint, its own schedule
  joint          both losses, backbone trainable
  pipeline       the embedded demo: every stage in turn, then samples and DIR/report.json
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py or configs/demo.py:smoke.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard files, samples.")
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); default: only when a multi-process "
                  "environment (TPU pod, SLURM, JAX_COORDINATOR_ADDRESS) is detected.")
flags.mark_flags_as_required(["config", "workdir"])


def maybe_initialize_distributed(requested: bool | None) -> None:
    """Multi-host runs need jax.distributed; single-host and CPU runs must never wait for a coordinator."""
    import jax

    detected = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")) or (
        int(os.environ.get("SLURM_NTASKS", "1")) > 1
    )
    if requested or (requested is None and detected):
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    del argv
    import jax

    from blip3o_jax import configlib

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    maybe_initialize_distributed(FLAGS.distributed)
    cfg = FLAGS.config
    try:
        configlib.validate(cfg, num_devices=jax.device_count())
    except configlib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    workdir = os.path.abspath(FLAGS.workdir)
    os.makedirs(workdir, exist_ok=True)
    if cfg.train.stage == "pipeline":
        from blip3o_jax import demo

        demo.run(cfg, workdir)
    else:
        train(cfg, workdir)


def train(cfg, workdir: str) -> dict:
    raise NotImplementedError(f"stage {cfg.train.stage!r} is not implemented yet")


if __name__ == "__main__":
    if {"-h", "--help", "--helpshort"} & set(sys.argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)  # absl would exit 1 on --help
    app.run(main)
