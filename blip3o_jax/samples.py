"""Samples during training (``train.sample_every``): a fixed set of prompts through the run's current
weights (their EMA when the run keeps one, ``train.ema_decay``), written as a PNG grid to ``STAGE_WORKDIR/samples/STEP.png`` and to TensorBoard (tag ``samples``).

The loss of a flow-matching head stays nearly flat while what it generates changes, so the trainer
shows the pictures themselves. The prompts (``train.sample_prompts``) go through the inference pipeline
exactly as ``python -m blip3o_jax.generate`` sends them (chat template, the run's tokenizer, the guided
sampler with ``flow.sample_steps`` / ``flow.guidance``), with the same noise at every sampling step
(seed ``train.seed``): two grids differ only because the weights did.

With a pixel decoder (``train.sample_decoder=DIR``: a decoder folder, diffusers or Orbax form, as
``generate --decoder``; ``train.sample_decoder_steps`` Euler steps) the features become images.
Without one, each sample's target-feature token grid is shown as a picture: its three principal
components as RGB. The projection (mean, components, value range) is fitted once, on the first samples
of the stage, and stored in ``samples/pca.npz``, so later grids (and those of a resumed run) use the
same colours and are comparable.

Every process computes (the model may be sharded over all of them); process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os

import jax
import numpy as np
from PIL import Image

from blip3o_jax import checkpoints, configlib, inference

SAMPLES_DIR = "samples"
PCA_FILE = "pca.npz"
TILE = 128  # pixels per sample side in the grid
GAP = 2  # pixels between tiles
COLUMNS = 4
# Stages whose generation head is trained (the others have nothing new to show).
STAGES = ("generation", "instruction", "joint")


class TrainingSamples:
    """``due(step)`` / ``write(step, model, writer)`` for the trainer's loop; a no-op when disabled."""

    def __init__(self, cfg, workdir: str, tokenizer, mesh):
        t = cfg.train
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        self.every = int(t.sample_every)
        self.enabled = self.every > 0 and t.stage in STAGES
        if self.every > 0 and not self.enabled:
            logging.info("samples: stage %s trains no generation head; train.sample_every ignored", t.stage)
        self.dir = os.path.join(workdir, SAMPLES_DIR)
        self.prompts = tuple(t.sample_prompts)
        self.decoder, self.negative = None, inference.DEFAULT_NEGATIVE
        if self.enabled and t.sample_decoder:
            self.decoder, self.negative = _load_decoder(t.sample_decoder, mesh, cfg)
        self._pca = None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def write(self, step: int, model, writer=None) -> str:
        """Samples the prompts with ``model`` (a Blip3o with the run's current weights); returns the PNG path.
        ``writer``: the run's metrics.MetricsWriter (TensorBoard)."""
        pipe = inference.Pipeline(model, self.tokenizer, self.cfg, self.mesh, self.decoder, negative=self.negative)
        seed, flow = int(self.cfg.train.seed), self.cfg.flow
        feats = pipe.generate_features(self.prompts, seed=seed, num_steps=flow.sample_steps, guidance=flow.guidance)
        if self.decoder is not None:
            pictures = pipe.decode(feats, seed=seed, num_steps=self.cfg.train.sample_decoder_steps,
                                   negative_steps=flow.sample_steps, negative_guidance=flow.guidance)
        else:
            pictures = self.feature_pictures(feats)
        grid = image_grid(pictures)
        path = os.path.join(self.dir, f"{step}.png")
        if jax.process_index() == 0:
            os.makedirs(self.dir, exist_ok=True)
            prompts_file = os.path.join(self.dir, "prompts.json")
            if not os.path.exists(prompts_file):  # tile i (row-major) is prompt i
                with open(prompts_file, "w") as f:
                    json.dump(list(self.prompts), f, indent=1)
            Image.fromarray(grid).save(path)
            if writer is not None:
                writer.image("samples", step, grid)
        logging.info("samples: step %d -> %s", step, path)
        return path

    def feature_pictures(self, feats: np.ndarray) -> np.ndarray:
        """(B, N, C) target features -> (B, h, w, 3) uint8 through the stage's fixed PCA."""
        if self._pca is None:
            self._pca = _load_or_fit_pca(os.path.join(self.dir, PCA_FILE), feats)
        return pca_pictures(feats, **self._pca)


def _load_decoder(path: str, mesh, cfg):
    """(Decoder, negative) for ``train.sample_decoder``; the negative is that of the checkpoint the decoder
    folder sits in (its pipeline.json: the demo's decoder was trained against 'zero_image'), else the default."""
    if not checkpoints.is_decoder_dir(path):
        raise configlib.ConfigError(
            f"config key 'train.sample_decoder': {path!r} is not a decoder folder (unet/ + vae/ + scheduler/ in "
            "diffusers layout, or params/ + config.json written by blip3o_jax.convert)")
    decoder = checkpoints.load_decoder(path, mesh, cfg.sharding.target)
    parent = os.path.dirname(os.path.abspath(path))
    return decoder, checkpoints.pipeline_defaults(parent).get("negative", inference.DEFAULT_NEGATIVE)


def fit_pca(feats: np.ndarray) -> dict:
    """Mean (C,), the top three principal directions (3, C) and the 1st / 99th percentile of each
    projection (the colour range) of all tokens of ``feats`` (B, N, C)."""
    x = np.asarray(feats, np.float64).reshape(-1, feats.shape[-1])
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = np.zeros((3, x.shape[1]))
    components[: min(3, len(vt))] = vt[:3]  # fewer than three directions (one token): the rest stay black
    proj = (x - mean) @ components.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    return {"mean": mean, "components": components, "lo": lo, "hi": hi}


def _load_or_fit_pca(path: str, feats: np.ndarray) -> dict:
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in ("mean", "components", "lo", "hi")}
    pca = fit_pca(feats)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **pca)
        os.replace(tmp, path)
    return pca


def pca_pictures(feats: np.ndarray, mean, components, lo, hi) -> np.ndarray:
    """(B, N, C) -> (B, side, side, 3) uint8 (N = side^2, row-major tokens; otherwise a 1 x N strip)."""
    b, n, _ = feats.shape
    proj = (np.asarray(feats, np.float64).reshape(b * n, -1) - mean) @ components.T
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    side = math.isqrt(n)
    shape = (side, side) if side * side == n else (1, n)
    return (rgb.reshape(b, *shape, 3) * 255).round().astype(np.uint8)


def image_grid(pictures: np.ndarray) -> np.ndarray:
    """(B, h, w, 3) uint8 -> one (H, W, 3) uint8 grid of TILE x TILE tiles, COLUMNS per row, white gaps.
    Token pictures are enlarged without smoothing (each token stays a square), decoded images resampled."""
    b, h, w, _ = pictures.shape
    cols = min(b, COLUMNS)
    rows = -(-b // cols)
    grid = np.full((rows * TILE + (rows - 1) * GAP, cols * TILE + (cols - 1) * GAP, 3), 255, np.uint8)
    resample = Image.NEAREST if max(h, w) < TILE // 4 else Image.BICUBIC
    for i, pic in enumerate(pictures):
        r, c = divmod(i, cols)
        tile = np.asarray(Image.fromarray(pic).resize((TILE, TILE), resample))
        grid[r * (TILE + GAP):r * (TILE + GAP) + TILE, c * (TILE + GAP):c * (TILE + GAP) + TILE] = tile
    return grid
