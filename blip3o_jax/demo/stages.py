"""The embedded demo (``configs/demo.py``): the whole BLIP3-o recipe at toy size on synthetic shapes.

Stages, each in its own folder under WORKDIR and each resumable (a finished stage is skipped):
  data           real webdataset tar shards of coloured shapes + a locally trained BPE tokenizer
  target         the EVA target encoder and the backbone's vision tower are given semantic features
                 honestly: a short supervised run in which linear probes on their mean token must
                 read colour, shape and position
  understanding  the Qwen2.5-VL decoder learns to answer questions about images (and to restate
                 text-to-image prompts); its vision tower stays as the target stage left it
  generation     backbone frozen; queries + DiT head learn flow matching onto the EVA features
  decoder        a tiny pixel-space diffusion decoder (v prediction) learns EVA features -> pixels;
                 it needs only the target encoder, so it trains in a background thread while the
                 understanding and generation stages run (on 2 CPU cores one small-op XLA program
                 leaves part of them idle: measured 1.3x the throughput of the two stages in turn)
  checkpoint     WORKDIR becomes an ordinary model checkpoint (checkpoints.py: params/, config.json,
                 the tokenizer, diffusion-decoder/, pipeline.json), so ``generate --checkpoint WORKDIR``
                 reads it like any converted model
  report         held-out prompts -> images scored by pixel statistics; held-out questions ->
                 greedy answers; WORKDIR/report.json and a grid of samples
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import json
import logging
import os
import shutil
import threading
import time

import jax
import numpy as np
import optax
from flax import nnx
from PIL import Image
from tqdm import tqdm

from blip3o_jax import checkpoints, configlib, inference, sharding
from blip3o_jax.data import pipeline, preprocess, synthetic
from blip3o_jax.data.qwen_image_processor import QwenImageProcessor
from blip3o_jax.decoder import scheduler
from blip3o_jax.decoder.pixel_decoder import Decoder
from blip3o_jax.decoder.unet import UNet2DConditionModel
from blip3o_jax.demo import scoring as demo_scoring
from blip3o_jax.models import blip3o as model_lib


def _stage_config(cfg, stage: str, steps: int, init_from: str = "", learning_rate: float | None = None):
    c = copy.deepcopy(cfg)
    c.train.stage = stage
    c.train.num_steps = steps
    if learning_rate is not None:
        c.train.learning_rate = learning_rate
    c.train.init_from = init_from
    c.train.checkpoint_every = max(steps // 4, 1)
    return c


def _done(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, "params", "params"))


def _progress(steps, stage: str, position: int | None = None):
    """A progress bar like the trainer's for the demo's own small training loops (``position`` 1 keeps
    the background decoder's bar under the trainer's)."""

    return tqdm(steps, desc=stage, unit="step", mininterval=2.0, dynamic_ncols=True, position=position)


# ---------------------------------------------------------------------------------------------
# Stage: semantic target encoder


def train_target_encoder(cfg, workdir: str, steps: int) -> None:
    """Supervised linear probes make the EVA target features and the backbone's vision tower (its merged
    image tokens) carry colour, shape and position; the probes are then discarded.

    The released model starts from pretrained EVA-CLIP and Qwen2.5-VL vision towers whose features
    already name these things; a from-scratch ViT learning them only through the language-model loss
    of the understanding stage takes far longer than the demo's budget (measured: it then learns one
    attribute)."""

    if _done(workdir):
        return
    mesh = sharding.make_mesh(cfg.mesh)
    model = model_lib.build_model(cfg, mesh)
    colors, shapes, positions = list(synthetic.COLORS), list(synthetic.SHAPES), list(synthetic.POSITIONS)

    class Probes(nnx.Module):
        def __init__(self, width, rngs):
            self.color = nnx.Linear(width, len(colors), rngs=rngs)
            self.shape = nnx.Linear(width, len(shapes), rngs=rngs)
            self.position = nnx.Linear(width, len(positions), rngs=rngs)

        def loss(self, feats, labels):  # feats (B, N, C)
            # Every probe reads the mean token, so position must live in the tokens' content, not only
            # in which token is active: the decoder's and the DiT's cross-attention cannot see token order.
            ce = optax.softmax_cross_entropy_with_integer_labels
            pooled = feats.mean(axis=1)
            return sum(ce(probe(pooled), labels[:, k]).mean()
                       for k, probe in enumerate((self.color, self.shape, self.position)))

    # The understanding stage's image preprocessing (data.samples.UnderstandingTransform).
    geometry = preprocess.ImagePreprocessor(cfg.data.und_image_size).geometry
    processor = QwenImageProcessor(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    _, vit_grid = processor.preprocess_one(np.zeros((cfg.data.und_image_size,) * 2 + (3,), np.uint8))
    n_image_tokens = int(np.prod(vit_grid)) // processor.merge_size**2
    probes = (Probes(cfg.model.eva.width, nnx.Rngs(1)), Probes(cfg.model.llm.hidden_size, nnx.Rngs(2)))
    pre = preprocess.for_encoder(cfg.model.target_encoder, cfg.model.eva.image_size)
    rng = np.random.default_rng(cfg.data.seed + 7)
    batch_size = cfg.data.global_batch_size

    def draw():
        images, vit_pixels, labels = [], [], []
        for _ in range(batch_size):
            obj = synthetic.random_scene(rng, two_objects=False)
            picture = synthetic.render(obj, cfg.data.image_size, rng)
            images.append(pre(picture))
            vit_pixels.append(processor.preprocess_one(geometry(picture))[0])
            o = obj[0]
            labels.append((colors.index(o["color"]), shapes.index(o["shape"]), positions.index(o["position"])))
        return np.stack(images), np.concatenate(vit_pixels), np.asarray(labels, np.int32)

    tx = optax.adam(1e-3)
    graphdef, params = nnx.split((model.target_encoder, model.backbone.visual, probes), nnx.Param)
    (params, opt_state), shardings = sharding.place_on_mesh((params, tx.init(params)), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    grids = np.tile(np.asarray(vit_grid, np.int64), (batch_size, 1))

    @functools.partial(jax.jit, in_shardings=(*shardings, None, None, None),
                       out_shardings=(*shardings, replicated), donate_argnums=(0, 1))
    def step(params, opt_state, images, vit_pixels, labels):
        def loss_fn(p):
            encoder, visual, (target_probes, vit_probes) = nnx.merge(graphdef, p)
            image_tokens = visual(vit_pixels, grids).reshape(batch_size, n_image_tokens, -1)
            return target_probes.loss(encoder.target_features(images), labels) + vit_probes.loss(image_tokens, labels)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh):
        for i in _progress(range(steps), "target encoder + vision tower"):
            params, opt_state, loss = step(params, opt_state, *draw())
            if (i + 1) % max(steps // 5, 1) == 0:
                logging.info("target encoder + vision tower step %d/%d: probe loss %.4f", i + 1, steps, float(loss))
    encoder, visual, _ = nnx.merge(graphdef, params)
    nnx.update(model.target_encoder, nnx.state(encoder, nnx.Param))
    nnx.update(model.backbone.visual, nnx.state(visual, nnx.Param))
    checkpoints.save_params(os.path.join(workdir, "params"), nnx.state(model), cfg.to_dict())


# ---------------------------------------------------------------------------------------------
# Stage: pixel decoder


def decoder_uncond(model):
    """The decoder's negative condition: target features of an all-zero (normalized) image, as in the
    Emu2-style autoencoding path (docs/model.md 3.3 b); the same tokens are used in training and sampling."""
    s = model.target_encoder.cfg.image_size
    return model.target_encoder.target_features(np.zeros((1, s, s, 3), np.float32))


def train_decoder(cfg, workdir: str, model, steps: int, stop: threading.Event | None = None,
                  bar_position: int | None = None):
    """Trains the tiny pixel-space UNet on (EVA features of a rendered scene -> that scene at
    sample_size * pixel_patch px). The UNet sees the picture ``space_to_depth``-packed
    (``demo.decoder_pixel_patch``): 2x2 pixels per position quarter its convolutions' cost on CPU.

    Returns the ``Decoder``, or None if ``stop`` was set first (nothing is saved then: the
    stage is short and restarts from scratch)."""

    ucfg = configlib.component(cfg, "decoder")
    patch = cfg.demo.decoder_pixel_patch
    mesh = sharding.make_mesh(cfg.mesh)
    if checkpoints.is_decoder_dir(workdir):
        return checkpoints.load_decoder(workdir, mesh, cfg.sharding.target)
    unet = sharding.create_sharded(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(3)), mesh,
                                   sharding.rules_for(cfg.sharding.target))
    pre = preprocess.for_encoder(cfg.model.target_encoder, cfg.model.eva.image_size)
    rng = np.random.default_rng(cfg.data.seed + 11)
    size = ucfg.sample_size * patch
    uncond = decoder_uncond(model)
    encoder_def, encoder_state = nnx.split(model.target_encoder)
    graphdef, params = nnx.split(unet, nnx.Param)
    # The released decoder's Euler scheduler with the demo's prediction type (see scheduler.py).
    sched_cfg = scheduler.SchedulerConfig(prediction_type=cfg.demo.decoder_prediction_type)
    lr = cfg.demo.decoder_learning_rate
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), max(steps, 2), lr / 10))
    (params, opt_state), shardings = sharding.place_on_mesh((params, tx.init(params)), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    @functools.partial(jax.jit, in_shardings=(*shardings, None, None, None),
                       out_shardings=(*shardings, replicated), donate_argnums=(0, 1))
    def step(params, opt_state, images, pixels, key):
        feats = nnx.merge(encoder_def, encoder_state).target_features(images)
        x0 = scheduler.space_to_depth(pixels, patch)
        loss_fn = lambda p: scheduler.diffusion_loss(nnx.merge(graphdef, p), x0, feats, key, uncond=uncond,
                                                     cond_drop_prob=0.1, pixel_size=(size, size),
                                                     scheduler=sched_cfg)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh):
        for i in _progress(range(steps), "decoder", bar_position):
            if stop is not None and stop.is_set():
                return None
            images, pixels = [], []
            for _ in range(cfg.data.global_batch_size):
                scene = synthetic.random_scene(rng, two_objects=bool(rng.random() < 0.25))
                picture = synthetic.render(scene, cfg.data.image_size, rng)
                images.append(pre(picture))
                pixels.append(np.asarray(picture.resize((size, size), 3), np.float32) / 127.5 - 1.0)
            params, opt_state, loss = step(params, opt_state, np.stack(images), np.stack(pixels),
                                           jax.random.key(i))
            if (i + 1) % max(steps // 5, 1) == 0:
                logging.info("decoder step %d/%d: loss %.4f", i + 1, steps, float(loss))
    nnx.update(unet, params)
    decoder = Decoder(unet, scheduler=sched_cfg, pixel_patch=patch)
    checkpoints.save_decoder(decoder, workdir)  # the ordinary decoder layout: params/ + config.json
    return decoder


# ---------------------------------------------------------------------------------------------
# Evaluation


def understanding_accuracy(pipe, n: int, seed: int) -> dict:
    """Greedy answers (``Pipeline.understand``, as ``python -m blip3o_jax.understand``) to held-out
    questions about freshly rendered scenes, exact match."""

    rng = np.random.default_rng(seed)
    correct = 0
    for _ in range(n):
        scene = synthetic.random_scene(rng, two_objects=False)
        image = synthetic.render(scene, pipe.cfg.data.image_size, rng)
        qa = synthetic.questions_of(scene)[int(rng.integers(len(synthetic.questions_of(scene))))]
        correct += int(pipe.understand(image, qa["question"], max_new_tokens=6) == qa["answer"])
    return {"accuracy": correct / max(n, 1), "n": n}


def generation_accuracy(pipe, n: int, seed: int, decoder_steps: int = 50):
    """Held-out single-object prompts -> ``Pipeline.generate_images`` (as ``python -m blip3o_jax.generate``:
    chat template, condition, guided DiT sampling, guided decoder) -> pixels read back by demo_scoring;
    plus a grid of the samples."""

    rng = np.random.default_rng(seed)
    combos = [{"shape": s, "color": c, "position": p} for s in synthetic.SHAPES for c in synthetic.COLORS
              for p in synthetic.POSITIONS]
    objects = [combos[i] for i in rng.permutation(len(combos))[:n]] if n <= len(combos) else \
        [combos[i % len(combos)] for i in range(n)]
    captions = [synthetic.caption_of([o]) for o in objects]
    flow = pipe.cfg.flow
    images, _ = pipe.generate_images(captions, seed=seed, num_steps=flow.sample_steps, guidance=flow.guidance,
                                     decoder_steps=decoder_steps, decoder_guidance=3.0)
    result = demo_scoring.accuracy(list(images), objects)
    size = images.shape[1]
    cols = min(8, len(images))
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im), ((i % cols) * size, (i // cols) * size))
    return result, grid


# ---------------------------------------------------------------------------------------------


def write_checkpoint(cfg, workdir: str, model_run: str, decoder_dir: str, tokenizer_dir: str) -> None:
    """Makes WORKDIR an ordinary model checkpoint (checkpoints.py): the last stage's parameters and
    config, the tokenizer, the pixel decoder in ``diffusion-decoder/`` and the inference defaults the demo
    decoder needs (it was trained against the zero-image negative; the understanding images are
    resized as in training)."""
    source = checkpoints.model_dir(model_run)
    for name in (checkpoints.PARAMS_DIR, checkpoints.DECODER_DIR):
        shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    shutil.copytree(os.path.join(source, checkpoints.PARAMS_DIR), os.path.join(workdir, checkpoints.PARAMS_DIR))
    shutil.copyfile(os.path.join(source, checkpoints.CONFIG_FILE), os.path.join(workdir, checkpoints.CONFIG_FILE))
    shutil.copytree(decoder_dir, os.path.join(workdir, checkpoints.DECODER_DIR))
    checkpoints.copy_tokenizer(tokenizer_dir, workdir)
    checkpoints.write_pipeline_defaults(workdir, negative="zero_image", und_image_size=cfg.data.und_image_size,
                                        min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)


def compilation_cache_dir() -> str:
    """The demo's persistent XLA compilation cache, shared by every workdir (and by the test suite's
    smoke demo): ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/blip3o_jax/jax``
    (``~/.cache/blip3o_jax/jax``). Entries are keyed by the program and the XLA flags, so a cache shared
    across configs and machines only ever returns the program that was asked for."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "blip3o_jax", "jax")


def _use_compilation_cache() -> None:
    """Every stage rebuilds the same model (random init + restore) and the report compiles the
    samplers: on a 2-core CPU each costs tens of seconds of XLA compilation, which a second demo run
    (another workdir, or the smoke demo of the tests) then reads back instead."""
    jax.config.update("jax_compilation_cache_dir", compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(cfg, workdir: str, train_stage) -> dict | None:
    """``train_stage`` is ``blip3o_jax.train.train`` (one stage of the trainer). Returns the report, or None
    if a training stage was preempted (SIGTERM: its checkpoint is saved; the same command continues)."""

    start = time.time()
    d = cfg.demo
    _use_compilation_cache()
    data_dir = os.path.join(workdir, "data")
    tokenizer = pipeline.load_tokenizer(cfg, data_dir)  # writes the synthetic shards on first use
    logging.info("demo: data ready in %s", data_dir)

    target_dir = os.path.join(workdir, "target")
    train_target_encoder(cfg, target_dir, d.target_steps)

    # The decoder needs only the (frozen from here on) target encoder: it trains in a background thread
    # while the trainer runs understanding and generation. ``stop`` ends it early if they do not finish.
    # The same model object later takes the generation stage's weights for the report.
    mesh = sharding.make_mesh(cfg.mesh)
    model = model_lib.build_model(cfg, mesh)
    checkpoints.restore_into(model, target_dir)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decoder") as pool:
        decoder_job = pool.submit(train_decoder, cfg, os.path.join(workdir, "decoder"), model, d.decoder_steps,
                                  stop=stop, bar_position=1)
        try:
            previous = target_dir
            for stage, steps, lr in (("understanding", d.understanding_steps, None),
                                     ("generation", d.generation_steps, d.generation_learning_rate)):
                stage_dir = os.path.join(workdir, stage)
                if decoder_job.done():
                    decoder_job.result()  # a failed decoder stage stops the demo here, not after the stages
                if not _done(stage_dir):
                    train_stage(_stage_config(cfg, stage, steps, init_from=previous, learning_rate=lr), stage_dir,
                                tokenizer=tokenizer)
                if not _done(stage_dir):  # preempted: its checkpoint is saved and the same command continues
                    logging.info("demo: stopped during the %s stage; run the same command to continue", stage)
                    return None
                previous = stage_dir
            decoder = decoder_job.result()
        finally:
            stop.set()  # after a normal finish a no-op; otherwise the decoder thread ends within a step

    checkpoints.restore_into(model, previous)  # the decoder thread is done with it
    write_checkpoint(cfg, workdir, previous, os.path.join(workdir, "decoder"), os.path.join(data_dir, "tokenizer"))

    # The report goes through the inference pipeline of python -m blip3o_jax.generate / understand, with
    # the inference defaults the checkpoint just written declares.
    pipe = inference.Pipeline(model, tokenizer, cfg, mesh, decoder, **checkpoints.pipeline_defaults(workdir))
    understanding = understanding_accuracy(pipe, d.eval_questions, seed=cfg.data.seed + 101)
    generation, grid = generation_accuracy(pipe, d.eval_prompts, seed=cfg.data.seed + 202,
                                           decoder_steps=d.eval_decoder_steps)
    samples = os.path.join(workdir, "samples.png")
    grid.save(samples)
    report = {"generation": generation, "understanding": understanding, "wall_seconds": time.time() - start,
              "samples": os.path.relpath(samples, workdir)}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    logging.info("demo report: %s", json.dumps(report))
    return report
