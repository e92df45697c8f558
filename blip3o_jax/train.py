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

import logging
import os

import jax
from absl import app, flags
from flax import nnx

from blip3o_jax import checkpoints, cli, configlib, distributed, flops, metrics, optim, samples, sharding, training
from blip3o_jax.data import pipeline
from blip3o_jax.demo import stages as demo
from blip3o_jax.models import blip3o as model_lib

FLAGS = flags.FLAGS
cli.define_config_flag("configs/demo.py or configs/demo.py:smoke")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard files, samples.")
cli.define_distributed_flag()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    cli.setup_logging()
    distributed.maybe_initialize(FLAGS.distributed)  # before anything touches devices
    cfg = FLAGS.config
    try:
        configlib.validate(cfg, num_devices=jax.device_count())
    except configlib.ConfigError as e:
        raise app.UsageError(str(e)) from None
    workdir = os.path.abspath(FLAGS.workdir)
    os.makedirs(workdir, exist_ok=True)
    if cfg.train.stage == "pipeline":
        demo.run(cfg, workdir, train_stage=train)  # passed in: this module may be __main__
    else:
        train(cfg, workdir)


def train(cfg, workdir: str, *, tokenizer=None, sources=None, max_steps: int | None = None, devices=None) -> dict:
    """Runs (or resumes) one stage in ``workdir``; returns the last logged metrics.

    ``tokenizer`` / ``sources`` override the ones named by the config (the demo passes its own);
    ``max_steps`` stops early without changing the schedule; ``devices`` restricts the mesh.
    """
    stage = cfg.train.stage
    num_steps = int(cfg.train.num_steps)

    # ---- Mesh ---------------------------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh, devices)
    logging.info("stage %s: mesh %s over %d devices (%d processes)", stage, dict(mesh.shape), jax.device_count(),
                 jax.process_count())

    # ---- Data ---------------------------------------------------------------------------------
    data_dir = os.path.join(workdir, "data")  # where the synthetic demo set is written, if used
    tokenizer = tokenizer if tokenizer is not None else pipeline.load_tokenizer(cfg, data_dir)
    kind = "understanding" if stage == "understanding" else "generation"
    batches = pipeline.make_iterator(cfg, tokenizer, kind, sources, data_dir=data_dir)
    eval_batches = pipeline.make_eval_iterator(cfg, tokenizer, kind, sources, data_dir=data_dir) \
        if cfg.train.eval_every else None

    # ---- Model: parameters born sharded, split into trainable and frozen for this stage ----------
    model = model_lib.build_model(cfg, mesh)
    if cfg.train.init_from:
        checkpoints.restore_into(model, cfg.train.init_from, ema=cfg.train.init_from_ema)
    graphdef, trainable, frozen = nnx.split(model, model_lib.stage_trainable(cfg, stage), ...)
    frozen = model_lib.cast_frozen(cfg, stage, frozen)  # model.frozen_param_dtype (bf16 towers in generation)
    del model
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    logging.info("trainable parameters: %s; frozen: %s", f"{n_trainable:,}",
                 f"{sum(x.size for x in jax.tree.leaves(frozen)):,}")

    # ---- Optimizer, state and the jitted training step (training.py; plan.py compiles the same) ------
    tx = optim.make_optimizer(cfg.train)
    state = training.init_state(cfg, trainable, tx, mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    # The static image grid, if any; prepare_batch also checks each batch's ids (source named in errors).
    first_host, image_grid = model_lib.prepare_batch(next(batches), cfg, "the first training batch")
    precomputed = "target_features" in first_host  # no target-encoder pass to count in the MFU
    step_fn = training.jit_train_step(training.make_train_step(cfg, stage, graphdef, tx, image_grid),
                                      state_shardings, frozen_shardings, mesh)
    validator = None if eval_batches is None else \
        training.Validator(cfg, graphdef, state_shardings["params"], frozen_shardings, mesh, eval_batches)

    # ---- Resume ---------------------------------------------------------------------------------
    ckpt = checkpoints.RunCheckpointer(workdir, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, training.abstract_state(cfg, state["params"], tx, mesh))
        batches.set_state(data_state)  # a global stream position: valid on every process
        first_host = None  # read before the restore; the restored position re-reads from the right place
        logging.info("resumed from step %d", latest)
    step = int(state["step"])

    # ---- Loop -----------------------------------------------------------------------------------
    flops_per_step = model_lib.step_flops(cfg, stage, n_trainable, precomputed)
    writer = metrics.MetricsWriter(workdir, num_steps, initial_step=step)
    preemption = checkpoints.PreemptionWatcher()
    sampler = samples.TrainingSamples(cfg, workdir, tokenizer, mesh)  # train.sample_every
    profiler = training.Profiler(cfg, workdir)
    timer, last = metrics.StepTimer(), {}
    last_logged = step
    stop = num_steps if max_steps is None else min(num_steps, max_steps)
    config_json = cfg.to_dict()
    with jax.set_mesh(mesh):
        while step < stop:
            if first_host is not None:
                host, grid, first_host = first_host, image_grid, None
            else:
                host, grid = model_lib.prepare_batch(next(batches), cfg, f"the training batch of step {step + 1}")
            if grid != image_grid:
                raise ValueError(f"image grid changed from {image_grid} to {grid} mid-run (fixed shapes under jit)")
            batch = sharding.shard_host_batch(host, mesh)
            profiler.before_step(step + 1)
            state, out = step_fn(state, frozen, batch)
            step += 1
            profiler.after_step(step, state)
            writer.advance()
            evaluate = validator is not None and validator.due(step)
            if step % cfg.train.log_every == 0 or step == stop or evaluate:  # a validation row has the loss too
                out = jax.device_get(out)
                nonfinite = int(state["nonfinite"])
                dt = timer.lap() / (step - last_logged)
                last_logged = step
                row = {k: float(v) for k, v in out.items() if k != "finite"}
                row.update(step_time=dt, images_per_s=cfg.data.global_batch_size / dt,
                           mfu=flops.mfu(flops_per_step, dt), nonfinite_in_a_row=nonfinite)
                row.update(batches.counters.metrics())
                if evaluate:
                    row.update(validator(state, frozen))
                    timer.lap()  # the validation's time is not step time
                writer.write(step, row)
                last = row
                if nonfinite > cfg.train.max_nonfinite_steps:
                    ckpt.close()  # the last good checkpoint stays; nothing non-finite is saved
                    raise FloatingPointError(f"{nonfinite} non-finite steps in a row at step {step}; "
                                             f"last good checkpoint: {ckpt.latest_step()}")
            if sampler.due(step):  # samples/STEP.png + TensorBoard, from the EMA weights when the run keeps them
                sampler.write(step, nnx.merge(graphdef, state.get("ema", state["params"]), frozen), writer)
                timer.lap()  # sampling is not step time: the next logged step_time counts from here
                last_logged = step
            data_state = batches.get_state()
            preempted = preemption.requested() or ckpt.reached_preemption(step)
            if ckpt.should_save(step) or preempted or step == num_steps:
                if int(state["nonfinite"]) == 0:
                    ckpt.save(step, state, data_state, config_json, force=True)
            if preempted:
                logging.info("preemption: saved step %d, exiting", step)
                break
    profiler.stop(state)
    ckpt.close()
    if step == num_steps:  # a model checkpoint (trained + frozen parts) for the next stage or for inference
        params_dir = os.path.join(workdir, checkpoints.PARAMS_DIR)
        checkpoints.save_params(params_dir, nnx.state(nnx.merge(graphdef, state["params"], frozen)), config_json,
                                ema=state.get("ema"))  # params_ema/: the trained parameters' EMA
        if jax.process_index() == 0:
            tokenizer.save_pretrained(params_dir)  # so generate / understand --checkpoint WORKDIR need nothing else
    writer.close()
    batches.close()
    if eval_batches is not None:
        eval_batches.close()
    return last


def run() -> None:
    """``python -m blip3o_jax.train`` and the ``blip3o-train`` console script."""
    cli.run(main)


if __name__ == "__main__":
    run()
