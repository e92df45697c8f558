"""The embedded demo (``configs/demo.py``): the whole BLIP3-o recipe at toy size on synthetic shapes.

Stages, each in its own folder under WORKDIR and each resumable (a finished stage is skipped):
  data           real webdataset tar shards of coloured shapes + a locally trained BPE tokenizer
  target         the EVA target encoder is given semantic features honestly: a short supervised run
                 in which linear probes on its pooled tokens must read colour, shape and position
  understanding  the Qwen2.5-VL backbone (ViT + decoder) learns to answer questions about images
  generation     backbone frozen; queries + DiT head learn flow matching onto the EVA features
  decoder        a tiny diffusion decoder learns EVA features -> pixels (when available)
  report         held-out prompts -> images scored by pixel statistics; held-out questions ->
                 greedy answers; WORKDIR/report.json and a grid of samples
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time

import numpy as np


def _stage_config(cfg, stage: str, steps: int, init_from: str = ""):
    c = copy.deepcopy(cfg)
    c.train.stage = stage
    c.train.num_steps = steps
    c.train.init_from = init_from
    c.train.checkpoint_every = max(steps // 4, 1)
    return c


def _done(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, "params", "params"))


# ---------------------------------------------------------------------------------------------
# Stage: semantic target encoder


def train_target_encoder(cfg, workdir: str, steps: int) -> None:
    """Supervised probes make the EVA features carry colour, shape and position (then discarded)."""
    import jax
    import optax
    from flax import nnx

    from blip3o_jax import checkpointing, model as model_lib, preprocess, sharding
    from blip3o_jax.data import synthetic

    if _done(workdir):
        return
    mesh = sharding.make_mesh(cfg.mesh)
    model = model_lib.build_model(cfg, mesh)
    encoder = model.target_encoder
    n_tokens, width = (cfg.model.dit.input_size // cfg.model.dit.patch_size) ** 2, cfg.model.eva.width
    colors, shapes, positions = list(synthetic.COLORS), list(synthetic.SHAPES), list(synthetic.POSITIONS)

    class Probes(nnx.Module):
        def __init__(self, rngs):
            self.color = nnx.Linear(width, len(colors), rngs=rngs)
            self.shape = nnx.Linear(width, len(shapes), rngs=rngs)
            self.position = nnx.Linear(n_tokens * width, len(positions), rngs=rngs)

    probes = Probes(nnx.Rngs(1))
    pre = preprocess.for_encoder(cfg.model.target_encoder, cfg.model.eva.image_size)
    rng = np.random.default_rng(cfg.data.seed + 7)
    batch_size = cfg.data.global_batch_size

    def draw():
        images, labels = [], []
        for _ in range(batch_size):
            obj = synthetic.random_scene(rng, two_objects=False)
            images.append(pre(synthetic.render(obj, cfg.data.image_size, rng)))
            o = obj[0]
            labels.append((colors.index(o["color"]), shapes.index(o["shape"]), positions.index(o["position"])))
        return np.stack(images), np.asarray(labels, np.int32)

    tx = optax.adam(1e-3)
    params = nnx.state((encoder, probes), nnx.Param)
    graphdef, _ = nnx.split((encoder, probes), nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            enc, pr = nnx.merge(graphdef, p)
            feats = enc.target_features(images)  # (B, N, C)
            pooled = feats.mean(axis=1)
            ce = optax.softmax_cross_entropy_with_integer_labels
            loss = (ce(pr.color(pooled), labels[:, 0]).mean() + ce(pr.shape(pooled), labels[:, 1]).mean()
                    + ce(pr.position(feats.reshape(feats.shape[0], -1)), labels[:, 2]).mean())
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh):
        for i in range(steps):
            params, opt_state, loss = step(params, opt_state, *draw())
            if (i + 1) % max(steps // 5, 1) == 0:
                logging.info("target encoder step %d/%d: probe loss %.4f", i + 1, steps, float(loss))
    encoder_trained, _ = nnx.merge(graphdef, params)
    nnx.update(model.target_encoder, nnx.state(encoder_trained, nnx.Param))
    checkpointing.save_params(os.path.join(workdir, "params"), nnx.state(model), cfg.to_dict())


# ---------------------------------------------------------------------------------------------
# Stage: pixel decoder


def decoder_uncond(model):
    """The decoder's negative condition: target features of an all-zero (normalized) image, as in the
    Emu2-style autoencoding path (reference 3.3 b); the same tokens are used in training and sampling."""
    s = model.target_encoder.cfg.image_size
    return model.target_encoder.target_features(np.zeros((1, s, s, 3), np.float32))


def train_decoder(cfg, workdir: str, model, steps: int):
    """Trains the tiny pixel-space UNet on (EVA features of a rendered scene -> that scene at 32 px)."""
    import jax
    import optax
    from flax import nnx

    from blip3o_jax import checkpointing, configlib, preprocess, scheduler, sharding
    from blip3o_jax.data import synthetic
    from blip3o_jax.models.unet import UNet2DConditionModel

    ucfg = configlib.component(cfg, "decoder")
    mesh = sharding.make_mesh(cfg.mesh)
    unet = sharding.create_sharded(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(3)), mesh,
                                   sharding.rules_for(cfg.sharding.target))
    if _done(workdir):
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nnx.state(unet))
        nnx.update(unet, checkpointing.restore_params(os.path.join(workdir, "params"), abstract))
        return unet
    pre = preprocess.for_encoder(cfg.model.target_encoder, cfg.model.eva.image_size)
    rng = np.random.default_rng(cfg.data.seed + 11)
    size = ucfg.sample_size
    uncond = decoder_uncond(model)
    encoder_def, encoder_state = nnx.split(model.target_encoder)
    graphdef, params = nnx.split(unet, nnx.Param)
    tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-3, max(steps // 20, 1), max(steps, 2), 1e-4))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, pixels, key):
        feats = nnx.merge(encoder_def, encoder_state).target_features(images)
        loss_fn = lambda p: scheduler.diffusion_loss(nnx.merge(graphdef, p), pixels, feats, key, uncond=uncond,
                                                     cond_drop_prob=0.1)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    with jax.set_mesh(mesh):
        for i in range(steps):
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
    checkpointing.save_params(os.path.join(workdir, "params"), nnx.state(unet))
    return unet


# ---------------------------------------------------------------------------------------------
# Evaluation


def understanding_accuracy(cfg, model, tokenizer, n: int, seed: int) -> dict:
    """Greedy answers to held-out questions about freshly rendered scenes (exact match)."""
    from blip3o_jax import chat, decode
    from blip3o_jax.data import pipeline, synthetic

    transform = pipeline.make_transform(cfg, tokenizer, "understanding", und_image_size=cfg.data.und_image_size,
                                        min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    rng = np.random.default_rng(seed)
    correct, total = 0, 0
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for _ in range(n):
        scene = synthetic.random_scene(rng, two_objects=False)
        image = synthetic.render(scene, cfg.data.image_size, rng)
        qa = synthetic.questions_of(scene)[int(rng.integers(len(synthetic.questions_of(scene))))]
        patches, grid = transform.processor.preprocess_one(transform.geometry(image))
        prompt = chat.understanding_prompt(qa["question"], chat.num_image_tokens(grid))
        ids = np.asarray([tokenizer.encode(prompt, add_special_tokens=False)], np.int32)
        out = decode.generate(model.backbone, ids, max_new_tokens=6, eos_token_ids=(im_end,),
                              pad_token_id=cfg.model.pad_token_id, pixel_values=patches,
                              image_grid_thw=np.asarray([grid]))
        answer = tokenizer.decode([t for t in out[0] if t not in (im_end, cfg.model.pad_token_id)]).strip()
        correct += int(answer == qa["answer"])
        total += 1
    return {"accuracy": correct / max(total, 1), "n": total}


def generated_features(cfg, model, tokenizer, captions: list[str], seed: int):
    """prompt -> chat template -> condition -> guided DiT sampling -> target features (B, N, C)."""
    import jax

    from blip3o_jax import chat

    ids = [tokenizer.encode(chat.t2i_prompt(c), add_special_tokens=False) for c in captions]
    length = max(len(i) for i in ids)
    batch = np.full((len(ids), length), cfg.model.pad_token_id, np.int32)
    mask = np.zeros_like(batch)
    for r, row in enumerate(ids):  # left padding, as in generation
        batch[r, length - len(row):] = row
        mask[r, length - len(row):] = 1
    z = model.condition(batch, mask)
    n, c = model.gen_head.target_shape
    noise = jax.random.normal(jax.random.key(seed), (len(ids), n, c))
    return model.sample_features(z, noise, num_steps=cfg.flow.sample_steps, guidance=cfg.flow.guidance)


def generation_accuracy(cfg, model, unet, tokenizer, n: int, seed: int):
    """Held-out single-object prompts -> features -> pixels, read back by demo_scoring; plus a grid."""
    import jax
    from PIL import Image

    from blip3o_jax import demo_scoring, scheduler
    from blip3o_jax.data import synthetic

    rng = np.random.default_rng(seed)
    combos = [{"shape": s, "color": c, "position": p} for s in synthetic.SHAPES for c in synthetic.COLORS
              for p in synthetic.POSITIONS]
    objects = [combos[i] for i in rng.permutation(len(combos))[:n]] if n <= len(combos) else \
        [combos[i % len(combos)] for i in range(n)]
    captions = [synthetic.caption_of([o]) for o in objects]
    feats = generated_features(cfg, model, tokenizer, captions, seed)
    size = unet.cfg.sample_size
    images = scheduler.decode_features(unet, feats, decoder_uncond(model), jax.random.key(seed + 1), height=size,
                                       width=size, num_steps=50, guidance_scale=3.0)
    images = np.asarray(jax.device_get(images) * 255).round().astype(np.uint8)
    result = demo_scoring.accuracy(list(images), objects)
    cols = 8
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (cols * size, rows * size), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im), ((i % cols) * size, (i // cols) * size))
    return result, grid


# ---------------------------------------------------------------------------------------------


def run(cfg, workdir: str, train_stage) -> dict:
    """``train_stage`` is ``blip3o_jax.train.train`` (one stage of the trainer)."""
    import jax

    from blip3o_jax import model as model_lib, sharding
    from blip3o_jax.data import pipeline

    start = time.time()
    d = cfg.demo
    data_dir = os.path.join(workdir, "data")
    tokenizer = pipeline.load_tokenizer(cfg, data_dir)  # writes the synthetic shards on first use
    logging.info("demo: data ready in %s", data_dir)

    target_dir = os.path.join(workdir, "target")
    train_target_encoder(cfg, target_dir, d.target_steps)

    stages = [("understanding", d.understanding_steps, target_dir), ("generation", d.generation_steps, None)]
    previous = target_dir
    for stage, steps, _ in stages:
        stage_dir = os.path.join(workdir, stage)
        if not _done(stage_dir):
            train_stage(_stage_config(cfg, stage, steps, init_from=previous), stage_dir, tokenizer=tokenizer)
        previous = stage_dir

    mesh = sharding.make_mesh(cfg.mesh)
    model = model_lib.build_model(cfg, mesh)
    model_lib.load_params(model, previous, mesh)
    unet = train_decoder(cfg, os.path.join(workdir, "decoder"), model, d.decoder_steps)

    with jax.set_mesh(mesh):
        understanding = understanding_accuracy(cfg, model, tokenizer, d.eval_questions, seed=cfg.data.seed + 101)
        generation, grid = generation_accuracy(cfg, model, unet, tokenizer, d.eval_prompts, seed=cfg.data.seed + 202)
    samples = os.path.join(workdir, "samples.png")
    grid.save(samples)
    report = {"generation": generation, "understanding": understanding, "wall_seconds": time.time() - start,
              "samples": os.path.relpath(samples, workdir)}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    logging.info("demo report: %s", json.dumps(report))
    return report
