"""The inference pipeline shared by ``generate``, ``understand``, ``eval`` and the demo report
(docs/model.md 3.1-3.3, 7, 9).

``Pipeline.from_checkpoint(DIR)`` loads the model, its tokenizer and (when present) the pixel decoder
from a model checkpoint (``convert`` output, a finished training run, the demo's WORKDIR) or a PyTorch
directory in the released layout (converted on the fly); ``blip3o_jax.checkpoints`` describes both
layouts. A checkpoint's ``pipeline.json`` sets its inference defaults (e.g. the demo decoder's negative).

Paths through the model:

- text -> image (3.1): ``chat.t2i_prompt`` -> tokens (left-padded to a length bucket) -> ``condition``
  -> guided ``sample_features`` (30 steps, 3.0) -> target features -> ``decode`` (50 Euler steps,
  guidance 3.0 against negative features) -> uint8 images.
- image + text -> image (3.3a): ``<image>`` in the prompt becomes vision_start + image pads +
  vision_end; the image is squashed to ``edit_image_size`` (448) and run through the Qwen ViT; 1-D
  positions; then as above.
- image -> image (3.3b): target encoder -> features -> ``decode`` (no LLM).
- image + question -> text (3.2): Qwen2.5-VL processor -> ``decode.generate`` with the KV cache.

The decoder's negative features are, as in the released pipeline (``diffusion-decoder/pipeline_llava_gen.py``:
``generate_image(text=[" "])``; docs/model.md fact 11), the generator's output for the raw prompt ``" "``
(one space: token 220 in the Qwen vocabulary, then the marker and the queries, no chat template),
computed once and cached (``negative="space_prompt"``, the default). ``"empty_prompt"`` feeds only the
marker and the queries (the ``""`` of pipeline_reconstruct.py); the demo's decoder was trained against
the target features of an all-zero image (docs/model.md 3.3b), which ``negative="zero_image"`` selects
(the demo's checkpoint says so in its pipeline.json, and a checkpoint's pipeline.json wins over the
default).

Understanding (3.2) stays greedy unless a temperature is given; a checkpoint's ``generation_config.json``
(Qwen's: ``repetition_penalty`` 1.05, eos ids) supplies the repetition penalty and extra stop ids, as
transformers' ``generate`` applies them. The DiT sampler's schedule (shift, num_train_timesteps) comes
from ``scheduler/scheduler_config.json`` at the checkpoint root when present (checkpoints.read_dit_scheduler).

Everything that is compiled (``condition``, the DiT sampler, the decoder loop, the KV-cache decoder)
is compiled once per shape: prompts are padded to length buckets and batches to ``batch_size``, so a
long prompt list reuses the same executables. Noise is drawn per image from ``fold_in(key(seed), i)``,
so an image depends on its seed and index, not on how the list was batched.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from blip3o_jax import checkpoints, decode, sharding
from blip3o_jax.checkpoints import CheckpointError
from blip3o_jax.data import chat, preprocess
from blip3o_jax.data import qwen_image_processor as qip
from blip3o_jax.decoder import scheduler as sched_lib
from blip3o_jax.decoder.pixel_decoder import Decoder
from blip3o_jax.decoder.vae import AutoencoderKL

IMAGE_TAG = "<image>"
EDIT_PROMPT = IMAGE_TAG + "\nPlease reconstruct the given image."  # the I2I training prompt (docs/model.md 3.3a)
EDIT_IMAGE_SIZE = 448  # 3.3a: 448 x 448 -> (1, 32, 32) patches -> 256 image tokens
NEGATIVES = ("space_prompt", "empty_prompt", "zero_image")
DEFAULT_NEGATIVE = "space_prompt"
SPACE_PROMPT = " "  # generate_image(text=[" "]) of the released pipeline_llava_gen.py
# Autoencoding geometry (docs/model.md 3.3b): "crop" = the repository's inference.py (centre square crop
# with floor offsets, then pipeline_reconstruct's Resize((448, 448))); "squash" = pipeline_reconstruct.py
# alone (Resize((448, 448)), aspect ignored). Both bicubic.
RESIZES = ("crop", "squash")
# Separate random streams per use, so adding images or the negative never shifts another stream.
_DIT_STREAM, _DECODER_STREAM, _NEGATIVE_STREAM = 0, 1, 2
# ``dtype`` presets of from_checkpoint (the names are blip3o_jax/cli.py DTYPE_PRESETS): name -> (dtype of
# the model (LLM, DiT, target encoder, ViT), dtype of the decoder (UNet, VAE), whether the samplers hold
# their latents in the producing model's dtype between steps). "released" = docs/model.md fact 20: the
# released inference script loads the whole model with torch_dtype=float16 (its DiT noise is drawn in
# and kept in float16) and the decoder's bf16 variant files, whose pipeline draws bfloat16 latents; both
# diffusers schedulers compute each Euler step in float32 and cast the result back to the model's dtype.
DTYPE_PRESETS = {"released": ("float16", "bfloat16", True)}


def resolve_dtype(dtype: Any) -> tuple[Any, Any, bool]:
    """(model dtype, decoder dtype, round latents) of ``from_checkpoint(dtype=...)``: a preset name, or
    one dtype (or None: the stored one) for both models with float32 latents."""
    if isinstance(dtype, str) and dtype in DTYPE_PRESETS:
        return DTYPE_PRESETS[dtype]
    return dtype, dtype, False


def inference_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """All (or the first ``num_devices``) devices on the fsdp axis: parameters are sharded by the
    config's rule tables, every device holds the whole (small) inference batch."""
    devices = jax.devices()[: num_devices or None]
    return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices)


# ---------------------------------------------------------------------------------------------
# The pipeline


class Pipeline:
    """Model + tokenizer + optional decoder, with the inference paths of docs/model.md 3 as methods.

    ``cfg`` is the project config of the model (checkpoints.load_model returns it);
    ``negative`` chooses the decoder's negative features ('space_prompt', 'empty_prompt' or 'zero_image');
    ``jpeg_quality``: re-encode understanding images as JPEG at this quality first (the official
    lmms-eval class does, at PIL's default 75); ``repetition_penalty`` / ``eos_token_ids``: the understanding
    decoder's (transformers semantics; from generation_config.json in from_checkpoint);
    ``und_image_size``: images are resized + centre-cropped to this side before the Qwen processor
    (the demo's understanding geometry; None = the processor's own smart resize only).
    """

    def __init__(self, model, tokenizer, cfg, mesh, decoder: Decoder | None = None, *,
                 negative: str = DEFAULT_NEGATIVE, min_pixels: int | None = None, max_pixels: int | None = None,
                 und_image_size: int | None = None, edit_image_size: int = EDIT_IMAGE_SIZE, negative_seed: int = 0,
                 round_latents: bool = False, jpeg_quality: int | None = None, repetition_penalty: float = 1.0,
                 eos_token_ids: Sequence[int] = ()):
        if negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
        self.model, self.tokenizer, self.cfg, self.mesh, self.decoder = model, tokenizer, cfg, mesh, decoder
        self.negative, self.negative_seed = negative, negative_seed
        # True: the DiT and decoder latents are rounded to their model's dtype after every float32 Euler
        # step, as the released pipeline does (DTYPE_PRESETS); False keeps them float32 between steps.
        self.round_latents = round_latents
        self.processor = qip.QwenImageProcessor(min_pixels=min_pixels or qip.RELEASED_MIN_PIXELS,
                                                max_pixels=max_pixels or qip.RELEASED_MAX_PIXELS)
        self.und_image_size, self.edit_image_size = und_image_size, edit_image_size
        if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100] (PIL), got {jpeg_quality}")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        self.jpeg_quality, self.repetition_penalty = jpeg_quality, float(repetition_penalty)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.flow_source = "the model config's flow section"
        # Padding takes the tokenizer's pad id, the config's only when the tokenizer has none: a small or
        # fine-tuned model's config may keep the released 151643 beyond its vocabulary. Checked against
        # the embedding wherever it is used (check_tokens), before any device work.
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(cfg.model.pad_token_id if pad is None else pad)
        self._pad_source = ("tokenizer.pad_token_id" if pad is not None
                            else "config model.pad_token_id; the tokenizer has no pad token")
        self._negative_cache: dict[tuple, jax.Array] = {}

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str, *, tokenizer: str | None = None, decoder: str | None = None,
                        dtype: Any = None, mesh=None, negative: str | None = None, load_decoder_weights: bool = True,
                        dit_scheduler: str | None = None, generation_config: bool = True, ema: bool = False,
                        **kw) -> "Pipeline":
        """A model checkpoint or PyTorch directory (checkpoints.py layouts). ``tokenizer`` / ``decoder``
        override the paths found in the checkpoint; ``negative`` and ``kw`` override the checkpoint's
        inference defaults (pipeline.json, preprocessor_config.json, generation_config.json unless
        ``generation_config`` is False: its repetition_penalty and eos ids); ``load_decoder_weights`` False skips
        the decoder (features only). ``dtype``: one dtype for model and decoder (None: the stored one) or
        a ``DTYPE_PRESETS`` name (``resolve_dtype``). ``dit_scheduler``: a FlowMatchEulerDiscreteScheduler
        config file or folder for the DiT sampler (default: the checkpoint root's
        scheduler/scheduler_config.json if present, else the model config's ``flow`` section);
        ``pipe.flow_source`` says which was used. ``ema``: the EMA weights of the trained parameters
        (the checkpoint's params_ema/, written by a training stage with train.ema_decay > 0)."""
        path = checkpoints.model_dir(path)
        mesh = mesh or inference_mesh()
        model_dtype, decoder_dtype, round_latents = resolve_dtype(dtype)
        kw.setdefault("round_latents", round_latents)
        model, cfg = checkpoints.load_model(path, model_dtype, mesh, ema=ema)
        flow_source = _apply_dit_scheduler(model, cfg, dit_scheduler or checkpoints.dit_scheduler_file(path))
        defaults = checkpoints.pipeline_defaults(path)
        if generation_config:
            defaults.update(checkpoints.generation_defaults(path))
        # A checkpoint's pipeline.json (the demo's: zero_image) wins over the released default.
        negative = negative or defaults.pop("negative", DEFAULT_NEGATIVE)
        defaults.pop("negative", None)
        for k, v in defaults.items():
            if kw.get(k) is None:  # an explicit None (a CLI flag left unset) means "the checkpoint's"
                kw[k] = v
        kw = {k: v for k, v in kw.items() if v is not None}  # unset and not in the checkpoint: the defaults
        tok = checkpoints.load_tokenizer(tokenizer or path)
        dec = None
        dec_dir = decoder or os.path.join(path, checkpoints.DECODER_DIR)
        if load_decoder_weights and (decoder is not None or os.path.isdir(dec_dir)):
            dec = checkpoints.load_decoder(dec_dir, mesh, cfg.sharding.target, decoder_dtype)
        pipe = cls(model, tok, cfg, mesh, dec, negative=negative, **kw)
        pipe.flow_source = flow_source or pipe.flow_source
        return pipe

    def require_decoder(self) -> Decoder:
        if self.decoder is None:
            raise CheckpointError(
                "this checkpoint has no pixel decoder (expected DIR/diffusion-decoder/: unet/ vae/ scheduler/ in "
                "diffusers layout, or its converted form). Point to one with "
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
        return self.check_tokens(out, "Pipeline.encode: the tokenizer's ids of the prompts"), mask

    def check_tokens(self, ids, source: str) -> np.ndarray:
        """The padding id, then ``ids``, checked against the model's embedding table on the host
        (models.qwen2_5_vl.TokenIdError names the id, the vocabulary size and ``source``)."""
        self.model.backbone.check_ids(self.pad_token_id, f"the padding id ({self._pad_source})")
        return self.model.backbone.check_ids(ids, source)

    def image_prompt(self, text: str, image) -> tuple[str, np.ndarray, np.ndarray]:
        """3.3a: (chat prompt with the image placeholder, pixel_values, image_grid_thw) for one image."""
        side = self.edit_image_size
        square = preprocess.ImagePreprocessor(side, mode="squash").geometry(image)
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
        if self.round_latents:  # the sampler keeps its latents in the noise's dtype (models/flow.py)
            noise = noise.astype(self.cfg.model.dtype)
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

        kind (default: the pipeline's ``negative``): 'space_prompt' = the generator on the raw string
        ``" "`` (the released pipeline_llava_gen.py's ``generate_image(text=[" "])``: the tokenizer's ids of
        one space, then the marker and the queries, no chat template; docs/model.md fact 11);
        'empty_prompt' = the same on ``""`` (marker + queries only); both with the DiT ``num_steps`` /
        ``guidance`` of the prompts. 'zero_image' = target features of an all-zero normalized image
        (docs/model.md 3.3b).
        """
        kind = kind or self.negative
        key = (kind,) if kind == "zero_image" else (kind, num_steps, guidance)
        if key not in self._negative_cache:
            with jax.set_mesh(self.mesh):
                if kind == "zero_image":
                    if self.model.target_encoder is None:
                        raise CheckpointError("negative 'zero_image' needs the target encoder; use 'space_prompt'")
                    s = self.model.target_encoder.cfg.image_size
                    neg = self.model.target_features(np.zeros((1, s, s, 3), np.float32))
                elif kind in ("space_prompt", "empty_prompt"):
                    z = self.negative_condition(kind)
                    neg = self._sample(z, [(self.negative_seed, 0)], _NEGATIVE_STREAM, num_steps, guidance)
                else:
                    raise ValueError(f"negative must be one of {NEGATIVES}, got {kind!r}")
            self._negative_cache[key] = neg
        return self._negative_cache[key]

    def negative_condition(self, kind: str = DEFAULT_NEGATIVE) -> jax.Array:
        """(1, n_query, H) condition of the prompt negatives: 'space_prompt' = ids of ``" "`` (Qwen: [220];
        a tokenizer that drops whitespace gives none, i.e. the empty prompt), 'empty_prompt' = no ids;
        unpadded, batch 1, as the released pipeline tokenizes it."""
        if kind not in ("space_prompt", "empty_prompt"):
            raise ValueError(f"prompt negatives are 'space_prompt' and 'empty_prompt', got {kind!r}")
        ids = self.tokenizer.encode(SPACE_PROMPT, add_special_tokens=False) if kind == "space_prompt" else []
        ids = np.asarray([ids], np.int32).reshape(1, -1)
        with jax.set_mesh(self.mesh):
            return self.model.condition(ids, np.ones(ids.shape, np.int32))

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
                if self.round_latents:  # the Euler loop keeps its latents in the noise's dtype
                    noise = noise.astype(dec.unet.dtype)
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

    def target_features(self, images: Sequence, resize: str = "crop") -> np.ndarray:
        """Target-encoder features (B, N, C) of images (PIL or uint8 arrays), encoder preprocessing.

        ``resize`` (RESIZES): 'crop' = centre square crop (side min(W, H), offsets (W - side) // 2 and
        (H - side) // 2), then resize to the encoder's side (the repository's inference.py); 'squash' =
        resize to side x side ignoring the aspect ratio (pipeline_reconstruct.py). PIL bicubic."""
        if self.model.target_encoder is None:
            raise CheckpointError("this checkpoint has no target encoder (autoencoding needs model.gen_vision_tower)")
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {sorted(RESIZES)}, got {resize!r}")
        size = self.model.target_encoder.cfg.image_size
        images = [square_crop(im) for im in images] if resize == "crop" else list(images)
        batch = preprocess.for_encoder(self.cfg.model.target_encoder, size, "squash").batch(images)
        with jax.set_mesh(self.mesh):
            return np.asarray(jax.device_get(self.model.target_features(batch)))

    def reconstruct(self, images: Sequence, *, seed: int = 0, decoder_steps: int = 50, decoder_guidance: float = 3.0,
                    size: int | None = None, resize: str = "crop") -> np.ndarray:
        """Autoencoding (docs/model.md 3.3b): image -> target encoder -> decoder -> uint8 images; the negative is
        the target features of an all-zero image, as in the reference's autoencoding pipeline. ``resize``:
        see target_features ('crop' = inference.py, 'squash' = pipeline_reconstruct.py)."""
        return self.decode(self.target_features(images, resize), seed=seed, num_steps=decoder_steps,
                           guidance=decoder_guidance, size=size, negative="zero_image")

    # -- image + question -> text (3.2) -------------------------------------------------------------

    def understand_tokens(self, image, question: str, *, max_new_tokens: int = 128, temperature: float = 0.0,
                          top_p: float = 1.0, seed: int = 0, repetition_penalty: float | None = None) -> list[int]:
        """Generated token ids for one image and question, up to (not including) the first stop token.

        ``repetition_penalty`` (default: the pipeline's, i.e. generation_config.json's or 1.0)."""
        if self.model.backbone.visual is None:
            raise CheckpointError("this checkpoint has no Qwen vision tower; understanding needs one")
        if self.jpeg_quality is not None:
            image = jpeg_round_trip(image, self.jpeg_quality)

        if self.und_image_size:
            image = preprocess.ImagePreprocessor(self.und_image_size).geometry(image)
        patches, grid = self.processor.preprocess_one(image)
        merge = self.model.backbone.vision_cfg.spatial_merge_size
        prompt = chat.understanding_prompt(question, chat.num_image_tokens(grid, merge))
        ids = np.asarray([self.tokenizer.encode(prompt, add_special_tokens=False)], np.int32)
        ids = self.check_tokens(ids, "Pipeline.understand: the tokenizer's ids of the prompt")
        stops = self.stop_token_ids()
        with jax.set_mesh(self.mesh):
            out = decode.generate(self.model.backbone, ids, max_new_tokens=max_new_tokens, eos_token_ids=stops,
                                  pad_token_id=self.pad_token_id, pixel_values=patches,
                                  image_grid_thw=np.asarray([grid]), temperature=temperature, top_p=top_p, seed=seed,
                                  repetition_penalty=self.repetition_penalty if repetition_penalty is None
                                  else repetition_penalty)
        tokens = [int(t) for t in out[0]]
        for i, t in enumerate(tokens):
            if t in stops:
                return tokens[:i]
        return tokens

    def understand(self, image, question: str, **kw) -> str:
        """Answer text for one image and question (greedy unless temperature > 0; see understand_tokens)."""
        return self.tokenizer.decode(self.understand_tokens(image, question, **kw), skip_special_tokens=True).strip()

    def stop_token_ids(self) -> tuple[int, ...]:
        """``<|im_end|>``, the tokenizer's eos (Qwen: <|im_end|>, <|endoftext|>) and generation_config.json's."""
        ids = set(self.eos_token_ids)
        for token in (chat.IM_END, "<|endoftext|>"):
            i = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                ids.add(i)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))


def _apply_dit_scheduler(model, cfg, file: str | None) -> str | None:
    """Sets the DiT sampler's schedule fields (models/flow.py FlowConfig: shift, num_train_timesteps) from a
    FlowMatchEulerDiscreteScheduler config file (checkpoints.read_dit_scheduler checks it); returns a
    description of what was used, None without a file (the model config's ``flow`` section stays)."""
    if file is None:
        return None
    values = checkpoints.read_dit_scheduler(file)
    head = model.gen_head
    if not hasattr(head, "flow_cfg"):
        raise CheckpointError(f"--dit-scheduler {file}: this model's generation head "
                              f"({cfg.model.gen_head!r}) has no flow sampler")
    head.flow_cfg = dataclasses.replace(head.flow_cfg, **values)
    for k, v in values.items():
        cfg.flow[k] = v
    return f"{file} ({', '.join(f'{k}={v}' for k, v in sorted(values.items()))})"


def square_crop(image) -> Image.Image:
    """The centred min(W, H) square of an image, offsets rounded down (the repository's inference.py)."""
    image = preprocess.to_pil_rgb(image)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def jpeg_round_trip(image, quality: int) -> Image.Image:
    """The image saved as an RGB JPEG at ``quality`` and decoded again (PIL; 4:2:0 chroma subsampling,
    PIL's default), as the official lmms-eval class does before the Qwen processor."""
    buffer = io.BytesIO()
    preprocess.to_pil_rgb(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as im:
        return im.convert("RGB")


@nnx.jit
def _vae_decode(vae: AutoencoderKL, latents):
    return vae.decode(latents / vae.cfg.scaling_factor)


def open_image(path: str):
    with Image.open(path) as im:
        return im.convert("RGB")


def save_png(image: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)


__all__ = ["CheckpointError", "Decoder", "Pipeline", "inference_mesh", "open_image", "save_png"]
