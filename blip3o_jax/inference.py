"""The inference pipeline shared by ``generate``, ``understand``, ``eval`` and the demo report
(reference sections 3.1-3.3, 7, 9).

``Pipeline.from_checkpoint(DIR)`` loads the model, its tokenizer and (when present) the pixel decoder
from any of:

- an Orbax checkpoint of this project (``convert`` output): ``DIR/params`` + ``DIR/config.json``, the
  tokenizer files copied beside them and the decoder converted to ``DIR/diffusion-decoder/``
  (``params`` + ``config.json``);
- a PyTorch directory in the released layout (converted on the fly, convert.load_checkpoint), with its
  tokenizer files and ``diffusion-decoder/`` (unet/vae/scheduler in diffusers layout);
- a demo workdir (``python -m blip3o_jax.train --config configs/demo.py --workdir runs/demo``):
  ``generation/params`` (model + config), ``decoder/params`` (the tiny pixel-space UNet, its config in
  the run config's ``model.decoder``), the tokenizer in ``data/tokenizer``.

Paths through the model:

- text -> image (3.1): ``chat.t2i_prompt`` -> tokens (left-padded to a length bucket) -> ``condition``
  -> guided ``sample_features`` (30 steps, 3.0) -> target features -> ``decode`` (50 Euler steps,
  guidance 3.0 against negative features) -> uint8 images.
- image + text -> image (3.3a): ``<image>`` in the prompt becomes vision_start + image pads +
  vision_end; the image is squashed to ``edit_image_size`` (448) and run through the Qwen ViT; 1-D
  positions; then as above.
- image -> image (3.3b): target encoder -> features -> ``decode`` (no LLM).
- image + question -> text (3.2): Qwen2.5-VL processor -> ``decode.generate`` with the KV cache.

The decoder's negative features are, as in the released pipeline (reference fact 11), the generator's
output for the raw empty prompt ``""`` (no chat template), computed once and cached; the demo's
decoder was trained against the target features of an all-zero image instead (reference 3.3b,
demo.decoder_uncond), which ``negative="zero_image"`` selects (the default for demo workdirs).

Everything that is compiled (``condition``, the DiT sampler, the decoder loop, the KV-cache decoder)
is compiled once per shape: prompts are padded to length buckets and batches to ``batch_size``, so a
long prompt list reuses the same executables. Noise is drawn per image from ``fold_in(key(seed), i)``,
so an image depends on its seed and index, not on how the list was batched.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import configlib, decode, sharding
from blip3o_jax.data import chat
from blip3o_jax import checkpoints
from blip3o_jax.decoder import scheduler as sched_lib
from blip3o_jax.decoder.unet import UNet2DConditionModel, UNetConfig
from blip3o_jax.decoder.vae import AutoencoderKL, VAEConfig

IMAGE_TAG = "<image>"
EDIT_PROMPT = IMAGE_TAG + "\nPlease reconstruct the given image."  # the I2I training prompt (reference 3.3a)
EDIT_IMAGE_SIZE = 448  # 3.3a: 448 x 448 -> (1, 32, 32) patches -> 256 image tokens
DECODER_DIR = "diffusion-decoder"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
                   "preprocessor_config.json")
NEGATIVES = ("empty_prompt", "zero_image")
# Separate random streams per use, so adding images or the negative never shifts another stream.
_DIT_STREAM, _DECODER_STREAM, _NEGATIVE_STREAM = 0, 1, 2


class CheckpointError(ValueError):
    """A checkpoint directory misses something a requested path needs (the message says what to do)."""


def inference_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """All (or the first ``num_devices``) devices on the fsdp axis: parameters are sharded by the
    config's rule tables, every device holds the whole (small) inference batch."""
    devices = jax.devices()[: num_devices or None]
    return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)


# ---------------------------------------------------------------------------------------------
# The pixel decoder


@dataclasses.dataclass
class Decoder:
    """The diffusion decoder (reference 9): UNet, optional VAE (None = pixel space), scheduler."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None = None
    scheduler: sched_lib.SchedulerConfig = sched_lib.SchedulerConfig()
    pixel_patch: int = 1  # pixel space only: the UNet sees pixel_patch**2 pixels per position (space_to_depth)

    @property
    def downscale(self) -> int:
        """Pixels per UNet position along a side: the VAE's downscale, or the pixel patch."""
        return self.vae.cfg.downscale if self.vae is not None else self.pixel_patch

    @property
    def default_size(self) -> int:
        """The UNet's native image side in pixels (1024 for the released decoder)."""
        return self.unet.cfg.sample_size * self.downscale


def _dataclass(cls, values: dict):
    """A frozen config dataclass from JSON values (lists back to tuples so it stays hashable)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def _abstract(factory, mesh, table: str):
    return sharding.abstract_with_shardings(factory, mesh, sharding.rules_for(table))


def save_decoder(decoder: Decoder, path: str) -> None:
    """Orbax form of a decoder: ``path/params`` ({'unet': ..., 'vae': ...}) + ``path/config.json``."""
    params = {"unet": nnx.to_pure_dict(nnx.state(decoder.unet, nnx.Param))}
    if decoder.vae is not None:
        params["vae"] = nnx.to_pure_dict(nnx.state(decoder.vae, nnx.Param))
    config = {"unet": dataclasses.asdict(decoder.unet.cfg),
              "vae": dataclasses.asdict(decoder.vae.cfg) if decoder.vae is not None else None,
              "scheduler": dataclasses.asdict(decoder.scheduler), "pixel_patch": decoder.pixel_patch}
    checkpoints.save_params(path, params, config)


def load_orbax_decoder(path: str, mesh, rule_table: str = "replicated", dtype: Any = None) -> Decoder:
    """Inverse of ``save_decoder``; ``dtype`` None keeps the stored float32."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    kw = {} if dtype is None else dict(dtype=dtype, param_dtype=dtype)
    ucfg = _dataclass(UNetConfig, config["unet"])
    unet_def, unet_abs = _abstract(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0), **kw), mesh, rule_table)
    target = {"unet": unet_abs}
    vae_def = None
    if config.get("vae"):
        vcfg = _dataclass(VAEConfig, config["vae"])
        vae_def, target["vae"] = _abstract(lambda: AutoencoderKL(vcfg, rngs=nnx.Rngs(0), **kw), mesh, rule_table)
    restored = checkpoints.restore_params(path, {k: nnx.to_pure_dict(v) for k, v in target.items()})
    for name, state in target.items():
        nnx.replace_by_pure_dict(state, restored[name])
    return Decoder(nnx.merge(unet_def, target["unet"]),
                   nnx.merge(vae_def, target["vae"]) if vae_def is not None else None,
                   _dataclass(sched_lib.SchedulerConfig, config.get("scheduler") or {}),
                   int(config.get("pixel_patch", 1)))


def load_decoder(path: str, mesh, rule_table: str = "replicated", dtype: Any = None) -> Decoder:
    """A decoder folder in diffusers layout (``unet/``, ``vae/``, ``scheduler/``) or its Orbax form."""
    if os.path.exists(os.path.join(path, "unet", "config.json")):
        from blip3o_jax.decoder import mapping as decoder_mapping

        kw = {} if dtype is None else dict(dtype=dtype, param_dtype=dtype)
        unet, vae, sched = decoder_mapping.load_decoder(path, mesh, rule_table, **kw)
        return Decoder(unet, vae, sched)
    if os.path.isdir(os.path.join(path, "params")) and os.path.exists(os.path.join(path, "config.json")):
        return load_orbax_decoder(path, mesh, rule_table, dtype)
    raise CheckpointError(f"{path}: not a decoder folder (expected unet/ + vae/ + scheduler/ in diffusers layout, "
                          "or params/ + config.json written by blip3o_jax.convert)")


def _load_demo_decoder(cfg, path: str, mesh) -> Decoder:
    """The demo's pixel-space UNet (``WORKDIR/decoder/params``, config in ``cfg.model.decoder``, pixel patch
    ``cfg.demo.decoder_pixel_patch``, prediction type ``cfg.demo.decoder_prediction_type``)."""
    ucfg = configlib.component(cfg, "decoder")
    graphdef, abstract = _abstract(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0)), mesh, cfg.sharding.target)
    return Decoder(nnx.merge(graphdef, checkpoints.restore_params(path, abstract)),
                   scheduler=demo_decoder_scheduler(cfg), pixel_patch=cfg.demo.decoder_pixel_patch)


def demo_decoder_scheduler(cfg) -> sched_lib.SchedulerConfig:
    """The released decoder's Euler scheduler with the demo's ``demo.decoder_prediction_type``."""
    return sched_lib.SchedulerConfig(prediction_type=cfg.demo.decoder_prediction_type)


# ---------------------------------------------------------------------------------------------
# Checkpoint discovery


def _load_tokenizer(path: str):
    if os.path.isfile(path):  # a tokenizer.json
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def is_demo_workdir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "generation", "params", "params"))


def _image_processor_limits(path: str) -> dict:
    """min/max pixels of the checkpoint's preprocessor_config.json (else the Qwen2.5-VL defaults)."""
    from blip3o_jax.data import qwen_image_processor as qip

    limits = dict(min_pixels=qip.RELEASED_MIN_PIXELS, max_pixels=qip.RELEASED_MAX_PIXELS)
    file = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(file):
        with open(file) as f:
            pre = json.load(f)
        size = pre.get("size") or {}
        limits["min_pixels"] = int(pre.get("min_pixels") or size.get("shortest_edge") or limits["min_pixels"])
        limits["max_pixels"] = int(pre.get("max_pixels") or size.get("longest_edge") or limits["max_pixels"])
    return limits


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """Model + tokenizer + optional decoder, with the inference paths of reference 3 as methods.

    ``cfg`` is the project config of the model (convert.orbax_config / TorchDirectory.config);
    ``negative`` chooses the decoder's negative features ('empty_prompt' or 'zero_image');
    ``und_image_size``: images are resized + centre-cropped to this side before the Qwen processor
    (the demo's understanding geometry; None = the processor's own smart resize only).
    """

    def __init__(self, model, tokenizer, cfg, mesh, decoder: Decoder | None = None, *,
                 negative: str = "empty_prompt", min_pixels: int | None = None, max_pixels: int | None = None,
                 und_image_size: int | None = None, edit_image_size: int = EDIT_IMAGE_SIZE, negative_seed: int = 0):
        from blip3o_jax.data import qwen_image_processor as qip

        if negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
        self.model, self.tokenizer, self.cfg, self.mesh, self.decoder = model, tokenizer, cfg, mesh, decoder
        self.negative, self.negative_seed = negative, negative_seed
        self.processor = qip.QwenImageProcessor(min_pixels=min_pixels or qip.RELEASED_MIN_PIXELS,
                                                max_pixels=max_pixels or qip.RELEASED_MAX_PIXELS)
        self.und_image_size, self.edit_image_size = und_image_size, edit_image_size
        self.pad_token_id = int(cfg.model.pad_token_id)
        self._negative_cache: dict[tuple, jax.Array] = {}

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str, *, tokenizer: str | None = None, decoder: str | None = None,
                        dtype: Any = None, mesh=None, negative: str | None = None, load_decoder_weights: bool = True,
                        **kw) -> "Pipeline":
        """See the module docstring for the accepted layouts. ``tokenizer`` / ``decoder`` override the
        paths found in the checkpoint; ``negative`` None = 'zero_image' for demo workdirs, else
        'empty_prompt'; ``load_decoder_weights`` False skips the decoder (features only)."""
        from blip3o_jax import convert

        path = os.path.abspath(os.fspath(path))
        mesh = mesh or inference_mesh()
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint directory")
        if is_demo_workdir(path):
            model_dir = os.path.join(path, "generation", "params")
            model = convert.load_checkpoint(model_dir, dtype, mesh)
            cfg = convert.orbax_config(model_dir)
            tok_dir = os.path.join(path, "data", "tokenizer")
            dec_dir = os.path.join(path, "decoder", "params")
            demo_decoder = decoder is None and os.path.isdir(os.path.join(dec_dir, "params"))
            negative = negative or "zero_image"
            kw.setdefault("und_image_size", cfg.data.und_image_size)
            kw.setdefault("min_pixels", cfg.data.min_pixels)
            kw.setdefault("max_pixels", cfg.data.max_pixels)
        else:
            model = convert.load_checkpoint(path, dtype, mesh)
            if convert.is_orbax_checkpoint(path):
                cfg = convert.orbax_config(path)
            else:
                cfg = convert.TorchDirectory(path).config(model.cfg.param_dtype,
                                                          model.cfg.target_encoder != "none")
            tok_dir, dec_dir, demo_decoder = path, os.path.join(path, DECODER_DIR), False
            for k, v in _image_processor_limits(path).items():
                kw.setdefault(k, v)
        tok_path = tokenizer or tok_dir
        if not (os.path.isfile(tok_path) or has_tokenizer(tok_path)):
            raise CheckpointError(
                f"no tokenizer in {tok_path}: copy the checkpoint's tokenizer files (tokenizer.json, "
                "tokenizer_config.json, ...) there (python -m blip3o_jax.convert does) or pass --tokenizer PATH")
        tok = _load_tokenizer(tok_path)
        dec = None
        if load_decoder_weights:
            if decoder is not None:
                dec = load_decoder(decoder, mesh, cfg.sharding.target, dtype)
            elif demo_decoder:
                dec = _load_demo_decoder(cfg, dec_dir, mesh)
            elif os.path.isdir(dec_dir):
                dec = load_decoder(dec_dir, mesh, cfg.sharding.target, dtype)
        return cls(model, tok, cfg, mesh, dec, negative=negative or "empty_prompt", **kw)

    def require_decoder(self) -> Decoder:
        if self.decoder is None:
            raise CheckpointError(
                "this checkpoint has no pixel decoder (expected DIR/diffusion-decoder/: unet/ vae/ scheduler/ in "
                "diffusers layout, or its converted form; demo workdirs: DIR/decoder/params). Point to one with "
                "--decoder DIR, or save only the generated target features with --features-out FILE.npy")
        return self.decoder

    # -- tokens -----------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded (batch_size or len(texts), bucket) token ids and mask; rows past the texts repeat
        the last one (fixed batch shapes). An empty text gives an all-padding row."""
        ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        rows = batch_size or len(ids)
        ids = ids + [ids[-1]] * (rows - len(ids))
        length = decode.bucket_length(max(1, max(len(i) for i in ids)))
        out = np.full((rows, length), self.pad_token_id, np.int32)
        mask = np.zeros((rows, length), np.int32)
        for r, row in enumerate(ids):
            if row:
                out[r, length - len(row):] = row
                mask[r, length - len(row):] = 1
        return out, mask

    def image_prompt(self, text: str, image) -> tuple[str, np.ndarray, np.ndarray]:
        """3.3a: (chat prompt with the image placeholder, pixel_values, image_grid_thw) for one image."""
        from blip3o_jax.data.preprocess import ImagePreprocessor

        side = self.edit_image_size
        square = ImagePreprocessor(side, mode="squash").geometry(image)
        patches, grid = self.processor.preprocess_one(square)
        merge = self.model.backbone.vision_cfg.spatial_merge_size
        placeholder = chat.image_placeholder(chat.num_image_tokens(grid, merge))
        if IMAGE_TAG not in text:
            text = IMAGE_TAG + "\n" + text
        return chat.conversation(text.replace(IMAGE_TAG, placeholder, 1)), patches, np.asarray([grid])

    # -- text (+ image) -> target features ---------------------------------------------------------

    def _sample(self, z: jax.Array, seeds_and_indices: Sequence[tuple[int, int]], stream: int, num_steps: int,
                guidance: float) -> jax.Array:
        n, c = self.model.gen_head.target_shape
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(s), stream), i),
                                             (n, c), jnp.float32) for s, i in seeds_and_indices])
        return self.model.sample_features(z, noise, num_steps=num_steps, guidance=guidance)

    def generate_features(self, prompts: Sequence[str], *, seed: int = 0, num_steps: int = 30,
                          guidance: float = 3.0, num_images: int = 1, images: Sequence | None = None,
                          batch_size: int | None = None, template: bool = True) -> np.ndarray:
        """Target features (len(prompts) * num_images, N, C), prompt-major.

        ``images``: one input image per prompt for image-conditioned generation (3.3a; the prompt may
        contain ``<image>``). ``batch_size``: images per compiled call (default: all of them at once
        for text prompts, one for image prompts). ``template`` False tokenizes the raw strings.
        """
        items = [(p, k) for p in range(len(prompts)) for k in range(num_images)]
        if images is not None:
            if len(images) != len(prompts):
                raise ValueError(f"{len(images)} images for {len(prompts)} prompts (one image per prompt)")
            batch_size = 1  # grids may differ per image
        batch_size = batch_size or len(items)
        out = []
        with jax.set_mesh(self.mesh):
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                kw = {}
                if images is not None:
                    text, kw["pixel_values"], kw["image_grid_thw"] = self.image_prompt(prompts[chunk[0][0]],
                                                                                      images[chunk[0][0]])
                    texts = [text]
                else:
                    texts = [chat.t2i_prompt(prompts[p]) if template else prompts[p] for p, _ in chunk]
                ids, mask = self.encode(texts, batch_size)
                z = self.model.condition(ids, mask, **kw)
                index = [(seed, start + j) for j in range(batch_size)]  # padded rows: distinct, discarded
                feats = self._sample(z, index, _DIT_STREAM, num_steps, guidance)
                out.append(np.asarray(jax.device_get(feats))[:len(chunk)])
        return np.concatenate(out, axis=0)

    def negative_features(self, kind: str | None = None, num_steps: int = 30, guidance: float = 3.0) -> jax.Array:
        """(1, N, C) negative features for the decoder's guidance, computed once and cached.

        kind (default: the pipeline's ``negative``): 'empty_prompt' = the generator on the raw empty
        string, no chat template (reference fact 11; DiT ``num_steps`` / ``guidance`` as the prompts');
        'zero_image' = target features of an all-zero normalized image (reference 3.3b).
        """
        kind = kind or self.negative
        key = (kind,) if kind == "zero_image" else (kind, num_steps, guidance)
        if key not in self._negative_cache:
            with jax.set_mesh(self.mesh):
                if kind == "zero_image":
                    if self.model.target_encoder is None:
                        raise CheckpointError("negative 'zero_image' needs the target encoder; use 'empty_prompt'")
                    s = self.model.target_encoder.cfg.image_size
                    neg = self.model.target_features(np.zeros((1, s, s, 3), np.float32))
                elif kind == "empty_prompt":  # [IMG] + queries only
                    z = self.model.condition(np.zeros((1, 0), np.int32), np.zeros((1, 0), np.int32))
                    neg = self._sample(z, [(self.negative_seed, 0)], _NEGATIVE_STREAM, num_steps, guidance)
                else:
                    raise ValueError(f"negative must be one of {NEGATIVES}, got {kind!r}")
            self._negative_cache[key] = neg
        return self._negative_cache[key]

    # -- features -> pixels ------------------------------------------------------------------------

    def decode(self, features, *, seed: int = 0, num_steps: int = 50, guidance: float = 3.0,
               size: int | None = None, batch_size: int | None = None, first_index: int = 0,
               negative: str | None = None, negative_steps: int = 30, negative_guidance: float = 3.0) -> np.ndarray:
        """Target features (B, N, C) -> uint8 images (B, size, size, 3) through the diffusion decoder.

        Image i's decoder noise comes from (seed, first_index + i). ``negative*``: see negative_features.
        """
        dec = self.require_decoder()
        size = size or dec.default_size
        down = dec.downscale
        if size % down:
            raise ValueError(f"--size {size} must be a multiple of the decoder's downscale {down}")
        features = np.asarray(features, np.float32)
        uncond = self.negative_features(negative, negative_steps, negative_guidance) if guidance > 1.0 else None
        batch_size = batch_size or len(features)
        shape = (size // down, size // down, dec.unet.cfg.in_channels)
        out = []
        with jax.set_mesh(self.mesh):
            for start in range(0, len(features), batch_size):
                chunk = features[start:start + batch_size]
                rows = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
                noise = jnp.stack([
                    jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _DECODER_STREAM),
                                                         first_index + start + j), shape, jnp.float32)
                    for j in range(batch_size)])
                x = sched_lib.denoise(dec.unet, jnp.asarray(rows), uncond, noise, pixel_size=(size, size),
                                      num_steps=num_steps, guidance_scale=guidance, scheduler=dec.scheduler)
                if dec.vae is not None:
                    x = _vae_decode(dec.vae, x)
                x = sched_lib.depth_to_space(x, dec.pixel_patch)
                x = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
                out.append(np.asarray(jax.device_get(x))[:len(chunk)])
        return (np.concatenate(out) * 255).round().astype(np.uint8)

    def generate_images(self, prompts: Sequence[str], *, seed: int = 0, num_steps: int = 30, guidance: float = 3.0,
                        num_images: int = 1, decoder_steps: int = 50, decoder_guidance: float = 3.0,
                        size: int | None = None, images: Sequence | None = None,
                        batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images (P * K, S, S, 3), target features (P * K, N, C)), prompt-major."""
        self.require_decoder()
        feats = self.generate_features(prompts, seed=seed, num_steps=num_steps, guidance=guidance,
                                       num_images=num_images, images=images, batch_size=batch_size)
        pixels = self.decode(feats, seed=seed, num_steps=decoder_steps, guidance=decoder_guidance, size=size,
                             batch_size=batch_size, negative_steps=num_steps, negative_guidance=guidance)
        return pixels, feats

    # -- image -> image (3.3b) ----------------------------------------------------------------------

    def target_features(self, images: Sequence) -> np.ndarray:
        """Target-encoder features (B, N, C) of images (PIL or uint8 arrays), encoder preprocessing."""
        from blip3o_jax.data import preprocess

        if self.model.target_encoder is None:
            raise CheckpointError("this checkpoint has no target encoder (autoencoding needs model.gen_vision_tower)")
        size = self.model.target_encoder.cfg.image_size
        batch = preprocess.for_encoder(self.cfg.model.target_encoder, size).batch(list(images))
        with jax.set_mesh(self.mesh):
            return np.asarray(jax.device_get(self.model.target_features(batch)))

    def reconstruct(self, images: Sequence, *, seed: int = 0, decoder_steps: int = 50, decoder_guidance: float = 3.0,
                    size: int | None = None) -> np.ndarray:
        """Autoencoding (reference 3.3b): image -> target encoder -> decoder -> uint8 images; the negative is
        the target features of an all-zero image, as in the reference's autoencoding pipeline."""
        return self.decode(self.target_features(images), seed=seed, num_steps=decoder_steps,
                           guidance=decoder_guidance, size=size, negative="zero_image")

    # -- image + question -> text (3.2) -------------------------------------------------------------

    def understand_tokens(self, image, question: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int = 0) -> list[int]:
        """Generated token ids for one image and question, up to (not including) the first stop token."""
        if self.model.backbone.visual is None:
            raise CheckpointError("this checkpoint has no Qwen vision tower; understanding needs one")
        from blip3o_jax.data import preprocess

        if self.und_image_size:
            image = preprocess.ImagePreprocessor(self.und_image_size).geometry(image)
        patches, grid = self.processor.preprocess_one(image)
        merge = self.model.backbone.vision_cfg.spatial_merge_size
        prompt = chat.understanding_prompt(question, chat.num_image_tokens(grid, merge))
        ids = np.asarray([self.tokenizer.encode(prompt, add_special_tokens=False)], np.int32)
        stops = self.stop_token_ids()
        with jax.set_mesh(self.mesh):
            out = decode.generate(self.model.backbone, ids, max_new_tokens=max_new_tokens, eos_token_ids=stops,
                                  pad_token_id=self.pad_token_id, pixel_values=patches,
                                  image_grid_thw=np.asarray([grid]), temperature=temperature, top_p=top_p, seed=seed)
        tokens = [int(t) for t in out[0]]
        for i, t in enumerate(tokens):
            if t in stops:
                return tokens[:i]
        return tokens

    def understand(self, image, question: str, **kw) -> str:
        """Answer text for one image and question (greedy unless temperature > 0; see understand_tokens)."""
        return self.tokenizer.decode(self.understand_tokens(image, question, **kw), skip_special_tokens=True).strip()

    def stop_token_ids(self) -> tuple[int, ...]:
        """``<|im_end|>`` and the tokenizer's eos (Qwen: <|im_end|>, <|endoftext|>)."""
        ids = set()
        for token in (chat.IM_END, "<|endoftext|>"):
            i = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                ids.add(i)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))


@nnx.jit
def _vae_decode(vae: AutoencoderKL, latents):
    return vae.decode(latents / vae.cfg.scaling_factor)


def open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


__all__ = ["CheckpointError", "Decoder", "Pipeline", "inference_mesh", "load_decoder", "load_orbax_decoder",
           "save_decoder", "open_image", "save_png"]
