"""The configuration schema (ml_collections) and its validation.

``base_config()`` returns the complete, locked schema with every key and its default; config files in
``configs/`` start from it and override values, so a misspelt key fails at once with the list of keys
that exist. The model sections are generated from the component dataclasses (``DiTConfig``,
``EvaConfig``, ...), so a component's config fields are defined in exactly one place, its model file.

The generation head's sections come from the head registry (blip3o_jax/models/heads.py): every
registered velocity network ``NAME`` gets ``model.NAME`` (``model.dit`` for the released DiT), every
head with a config of its own gets ``model.HEAD`` (``model.mse``), and the choices of
``model.gen_head`` / ``model.denoiser`` are the registered names. Nothing here names a head.

``validate(config, num_devices)`` checks types, choices and cross-field constraints (heads dividing
widths, widths agreeing between components, the mesh matching the device count) and raises
``ConfigError`` naming the offending key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from blip3o_jax.decoder.unet import UNetConfig
from blip3o_jax.models import attention, flow, heads
from blip3o_jax.models.eva_clip import EvaConfig
from blip3o_jax.models.qwen2_5_vl import QwenTextConfig
from blip3o_jax.models.qwen_vision import QwenVisionConfig
from blip3o_jax.models.siglip2 import Siglip2Config
from blip3o_jax.sharding import resolve_mesh_shape

COMPONENT_CONFIGS = {
    "llm": QwenTextConfig,
    "vision": QwenVisionConfig,
    "eva": EvaConfig,
    "siglip2": Siglip2Config,
    "decoder": UNetConfig,  # the diffusion decoder: target tokens -> pixels (docs/model.md 9)
    # The generation head's sections, from the registry.
    **{name: spec.config for name, spec in heads.VELOCITY_NETS.items()},
    **{name: spec.config for name, spec in heads.HEADS.items() if spec.config is not None},
}

assert len(COMPONENT_CONFIGS) == 5 + len(heads.VELOCITY_NETS) + sum(h.config is not None for h in heads.HEADS.values()), \
    "a registered head or velocity network shares its name with another config section"

CHOICES = {
    "model.gen_head": tuple(heads.HEADS),
    "model.denoiser": tuple(heads.VELOCITY_NETS),
    "model.target_encoder": ("eva_clip", "siglip2", "none"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16", "float16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    # Attention backend (models/attention.py); a component's own key ("" = follow model.attention) overrides it.
    "model.attention": attention.IMPLEMENTATIONS,
    **{f"model.{name}.attention": ("", *attention.IMPLEMENTATIONS) for name, cls in COMPONENT_CONFIGS.items()
       if "attention" in {f.name for f in dataclasses.fields(cls)}},
    "model.frozen_param_dtype": ("compute", "float32", "bfloat16", "float16"),
    "sharding.llm": ("replicated", "fsdp", "tensor"),
    "sharding.vision": ("replicated", "fsdp", "tensor"),
    "sharding.dit": ("replicated", "fsdp", "tensor"),
    "sharding.target": ("replicated", "fsdp", "tensor"),
    "flow.timestep_sampling": flow.TIMESTEP_SAMPLING,
    "flow.loss_weighting": flow.LOSS_WEIGHTING,
    "train.stage": ("understanding", "generation", "instruction", "joint", "decoder", "pipeline"),
    "train.schedule": ("cosine_with_min_lr", "cosine", "constant"),
    "precompute.feature_dtype": ("float32", "bfloat16"),
    "data.generation_prompt": ("training", "inference"),
    "demo.decoder_prediction_type": ("v_prediction", "epsilon", "sample"),
}


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the key."""


def component(cfg: ml_collections.ConfigDict, name: str):
    """The frozen dataclass of one model component from its config section."""
    cls = COMPONENT_CONFIGS[name]
    values = {f.name: getattr(cfg.model, name)[f.name] for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if isinstance(f.default, tuple):
            values[f.name] = tuple(values[f.name])
    if values.get("attention") == "":  # the component follows model.attention
        values["attention"] = cfg.model.attention
    return cls(**values)


def head_section(cfg: ml_collections.ConfigDict) -> str:
    """The ``model.*`` section that configures the active generation head (``dit`` for the released one)."""
    return heads.config_section(cfg.model.gen_head, cfg.model.denoiser)


def head_config(cfg: ml_collections.ConfigDict):
    """The frozen config dataclass of the active generation head (or of its velocity network)."""
    return component(cfg, head_section(cfg))


def from_dict(values: dict | None = None) -> ml_collections.ConfigDict:
    """``base_config()`` updated with a (possibly partial) config dict, e.g. one stored beside Orbax params.
    Lists become tuples where the schema has tuples; ints become floats where it has floats."""
    cfg = base_config()
    if values:
        _update_nested(cfg, _migrate(values))
    return cfg


def _migrate(values: dict) -> dict:
    """Configs stored before the head registry: the 'mse' head read its sizes from ``model.dit``; they
    now live in its own section ``model.mse`` (the 'flow' head's ``model.dit`` and its parameter paths
    ``gen_head/dit/...`` did not change)."""
    m = values.get("model") or {}
    if m.get("gen_head") == "mse" and "mse" not in m and "dit" in m:
        values = {**values, "model": {**m, "mse": {k: m["dit"][k] for k in ("input_size", "in_channels",
                                                                           "latent_embedding_size", "dim")
                                                   if k in m["dit"]}}}
    return values


def assign(section: ml_collections.ConfigDict, values: dict) -> None:
    """Assigns values into a locked section, converting JSON types to the schema's."""
    for key, value in values.items():
        if isinstance(section[key], tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(section[key], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        section[key] = value


def _update_nested(cfg: ml_collections.ConfigDict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(cfg[key], ml_collections.ConfigDict):
            _update_nested(cfg[key], value)
        else:
            assign(cfg, {key: value})


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default: the released 8B model and the paper's generation pre-training."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    for name, cls in COMPONENT_CONFIGS.items():
        c.model[name] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
    c.model.n_query = 64
    # Init std of the latent queries: torch.randn (1.0) in the reference. A tiny backbone trained from
    # scratch (the demo) needs them at its embeddings' scale, or the query states barely see the prompt.
    c.model.query_init_std = 1.0
    c.model.gen_start_token_id = 151665  # [IMG], marks the start of the 64 query slots
    c.model.query_token_id = 151667  # <image>, training placeholder overwritten by the queries
    c.model.image_pad_token_id = 151655  # <|image_pad|>, slots for Qwen-ViT image embeddings
    c.model.vision_start_token_id = 151652
    c.model.vision_end_token_id = 151653
    c.model.pad_token_id = 151643
    c.model.gen_head = "flow"  # flow: CLIP + flow matching; mse: queries regress targets (models/heads.py)
    c.model.denoiser = "dit"  # the flow head's velocity network; its config is section model.<denoiser>
    c.model.target_encoder = "eva_clip"
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.remat = "full"
    # Attention backend of every component (models/attention.py; README "Attention backends"): auto =
    # splash on TPU, cuDNN on GPU, each for the calls it takes and long enough; xla otherwise (CPU: xla).
    c.model.attention = "auto"
    # Storage dtype of the frozen parameters in the generation stages ("compute" = model.dtype; see
    # models/blip3o.py frozen_param_dtype): bfloat16 halves the frozen backbone + target encoder.
    c.model.frozen_param_dtype = "compute"

    # Flow matching (docs/model.md 6, 7).
    c.flow = ml_collections.ConfigDict()
    c.flow.num_train_timesteps = 1000
    c.flow.shift = 1.0
    c.flow.cond_dropout = 0.1
    c.flow.sample_steps = 30
    c.flow.guidance = 3.0
    # Which training timesteps are drawn and how each sample's error is weighted, with the names of
    # diffusers' SD3 training scripts (models/flow.py); the defaults are the reference's uniform, unweighted.
    c.flow.timestep_sampling = "uniform"  # uniform | logit_normal | mode
    c.flow.logit_mean = 0.0
    c.flow.logit_std = 1.0
    c.flow.mode_scale = 1.29
    c.flow.loss_weighting = "none"  # none | sigma_sqrt | cosmap

    # Device mesh: one axis may be -1 (= all remaining devices).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # One logical-axis rule table per component (blip3o_jax.sharding.RULE_TABLES); ``dit`` is the table of
    # the generation head (whichever is registered) and the latent queries.
    c.sharding = ml_collections.ConfigDict(dict(llm="fsdp", vision="fsdp", dit="fsdp", target="fsdp"))

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.paths = ""  # comma-separated files or globs (webdataset tars, ArrayRecord)
    c.data.global_batch_size = 512
    c.data.max_length = 512  # text + 65 image slots
    c.data.image_size = 448  # target-encoder input size
    c.data.num_workers = 0  # Grain worker processes for decode + preprocessing (0 = in-process)
    c.data.seed = 42
    c.data.tokenizer = ""  # tokenizer.json file or a Hugging Face tokenizer folder (local path)
    c.data.cache_dir = ""  # where tar indexes go when the shard folder is read-only ("" = ~/.cache)
    c.data.tfds_data_dir = ""
    c.data.und_image_size = 448  # understanding images: shorter side before the Qwen processor
    c.data.max_patches = 0  # fixed ViT patches per sample (0 = those of an und_image_size square)
    c.data.min_pixels = 3136
    c.data.max_pixels = 12845056
    c.data.max_turns = 0  # question/answer turns kept per understanding sample (0 = all)
    # With data.paths naming directories written by blip3o_jax.precompute: train on their stored
    # condition states too (the backbone and latent queries then get no gradient; the head trains alone).
    c.data.precomputed_condition = False
    # Text-to-image training sequence: "training" = the reference's (closed empty assistant turn), or
    # "inference" = the open assistant turn that inference conditions on (data.samples.generation_tokens).
    c.data.generation_prompt = "training"
    # The validation split (train.eval_every): its own files (as data.paths, one pass), or the last
    # eval_holdout records of the training data, which training then never reads.
    c.data.eval_paths = ""
    c.data.eval_holdout = 0

    # ``python -m blip3o_jax.precompute``: the frozen target encoder run once over config.data into
    # ArrayRecord shards that training reads instead of images (data.paths = the output directory).
    c.precompute = ml_collections.ConfigDict()
    c.precompute.records_per_shard = 4096  # input records per output file; the unit of resumption
    c.precompute.batch_size = 0  # global encoder batch (0 = data.global_batch_size)
    c.precompute.feature_dtype = "float32"  # stored dtype; bfloat16 halves the files but rounds
    c.precompute.with_condition = False  # also store the backbone's condition states (n_query, H)

    c.train = ml_collections.ConfigDict()
    c.train.stage = "generation"
    c.train.num_steps = 150_000
    c.train.learning_rate = 1e-4
    c.train.min_learning_rate = 1e-5
    c.train.schedule = "cosine_with_min_lr"
    c.train.warmup_ratio = 0.003
    c.train.weight_decay = 0.0
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.grad_clip = 1.0
    c.train.grad_accum = 1
    c.train.seed = 0
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 1
    c.train.init_from = ""  # an Orbax checkpoint or PyTorch directory to initialise parameters from
    c.train.init_from_ema = False  # take init_from's EMA weights (its params_ema/) where it has them
    # Exponential moving average of the trainable parameters, updated after every applied step
    # (ema = decay * ema + (1 - decay) * params); 0 = off, the reference recipe (no EMA in the state).
    c.train.ema_decay = 0.0
    # Validation: every eval_every steps (0 = never) the flow loss at fixed timesteps and noise on the
    # held-out split (data.eval_paths or data.eval_holdout), in that step's metrics row.
    c.train.eval_every = 0
    c.train.profile_steps = ""  # "START:END": a jax.profiler trace of steps START..END into WORKDIR/profile
    c.train.profile_all_hosts = False  # trace on every process (default: process 0 only)
    # Samples during training (blip3o_jax/samples.py): every sample_every steps (0 = never) these prompts
    # through the sampler -> STAGE_WORKDIR/samples/STEP.png + TensorBoard; decoded to pixels by the decoder
    # folder sample_decoder, else shown as a PCA picture of the target features.
    c.train.sample_every = 0
    c.train.sample_prompts = ("a red circle on the left", "a blue square at the top",
                              "a photo of a cat sitting on a sofa", "a city street at night in the rain")
    c.train.sample_decoder = ""
    c.train.sample_decoder_steps = 50  # the decoder's Euler steps (inference's default)
    c.train.max_nonfinite_steps = 10
    c.train.freeze_vision_tower = False  # understanding / joint: train the LLM only, keep the Qwen ViT fixed
    c.train.freeze_latent_queries = False  # generation / instruction / joint: keep the queries at their init

    # The embedded demo (train.stage = "pipeline"): steps of each stage and evaluation sizes.
    c.demo = ml_collections.ConfigDict()
    c.demo.target_steps = 300
    c.demo.understanding_steps = 600
    c.demo.generation_steps = 1500
    c.demo.generation_learning_rate = 1e-3  # the generation stage's peak (the others use train.learning_rate)
    c.demo.decoder_steps = 1500
    c.demo.decoder_learning_rate = 1e-3
    c.demo.decoder_pixel_patch = 2  # the pixel-space UNet sees 2x2 pixels per position (space_to_depth)
    # What the demo decoder predicts (its Euler scheduler is otherwise the released one); see scheduler.py
    # for why a tiny, briefly trained pixel decoder samples from v prediction but not from epsilon.
    c.demo.decoder_prediction_type = "v_prediction"
    c.demo.eval_questions = 48
    c.demo.eval_prompts = 48
    c.demo.eval_decoder_steps = 50  # the pixel decoder's sampling steps for the report's generated images

    c.lock()
    return c


# ---------------------------------------------------------------------------------------------
# Validation


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _check_schema(cfg: Any, ref: Any, prefix: str) -> None:
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if key not in ref:
            raise ConfigError(f"unknown config key {full!r}; allowed keys here: {sorted(ref.keys())}")
        value, default = cfg[key], ref[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config key {full!r} must be a section with keys {sorted(default.keys())}")
            _check_schema(value, default, full + ".")
        elif not _type_ok(value, default):
            raise ConfigError(
                f"config key {full!r} = {value!r} has type {type(value).__name__}; "
                f"expected {type(default).__name__} (default {default!r})"
            )


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key!r}: {message}")


def profile_steps(cfg: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """``train.profile_steps`` "START:END" as (START, END), steps numbered as in metrics.jsonl (the first
    step is 1, both ends traced); None when empty."""
    text = cfg.train.profile_steps.strip()
    if not text:
        return None
    parts = text.split(":")
    try:
        start, end = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        start = end = None
    _require(start is not None and 1 <= start <= end, "train.profile_steps",
             f"{cfg.train.profile_steps!r} is not 'START:END' with 1 <= START <= END (steps as in metrics.jsonl)")
    return start, end


def _validate_training_features(cfg: ml_collections.ConfigDict) -> None:
    """EMA, validation and profiling keys (train.ema_decay, train.eval_every, data.eval_*, train.profile_steps)."""
    t, d = cfg.train, cfg.data
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1) (0 = no EMA), got {t.ema_decay}")
    _require(not t.init_from_ema or bool(t.init_from), "train.init_from_ema",
             "needs train.init_from (the checkpoint whose params_ema/ to start from)")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = no validation), got {t.eval_every}")
    _require(d.eval_holdout >= 0, "data.eval_holdout", f"must be >= 0, got {d.eval_holdout}")
    _require(not (d.eval_paths and d.eval_holdout), "data.eval_holdout",
             "set either data.eval_paths or data.eval_holdout, not both")
    if t.eval_every:
        _require(bool(d.eval_paths) or d.eval_holdout > 0, "train.eval_every",
                 "needs a validation split: data.eval_paths or data.eval_holdout > 0")
        _require(t.stage in ("generation", "instruction", "joint"), "train.eval_every",
                 f"the validation loss is the generation head's; stage {t.stage!r} has none "
                 "(allowed: generation, instruction, joint)")
        _require(d.eval_holdout == 0 or d.eval_holdout >= d.global_batch_size, "data.eval_holdout",
                 f"{d.eval_holdout} records hold no full global batch of data.global_batch_size "
                 f"{d.global_batch_size}")
    profile_steps(cfg)


def _validate_samples(cfg: ml_collections.ConfigDict) -> None:
    """train.sample_* (the decoder folder itself is checked when the trainer loads it)."""
    t = cfg.train
    _require(t.sample_every >= 0, "train.sample_every", f"must be >= 0 (0 = no samples), got {t.sample_every}")
    _require(t.sample_decoder_steps > 0, "train.sample_decoder_steps", f"must be > 0, got {t.sample_decoder_steps}")
    if t.sample_every:
        _require(len(t.sample_prompts) > 0 and all(isinstance(p, str) and p.strip() for p in t.sample_prompts),
                 "train.sample_prompts", f"must be a non-empty tuple of non-empty strings, got {t.sample_prompts!r}")
        _require(t.stage in ("generation", "instruction", "joint", "pipeline"), "train.sample_every",
                 f"samples show the generation head; stage {t.stage!r} trains none "
                 "(allowed: generation, instruction, joint, pipeline)")


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None) -> ml_collections.ConfigDict:
    """Raises ConfigError for the first bad key; returns cfg unchanged when it is valid."""
    _check_schema(cfg, base_config(), "")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _require(value in allowed, key, f"{value!r} is not one of {list(allowed)}")

    m = cfg.model
    llm, vis, eva, sig = m.llm, m.vision, m.eva, m.siglip2
    positive = [
        "llm.hidden_size", "llm.num_hidden_layers", "llm.num_attention_heads", "llm.num_key_value_heads",
        "llm.vocab_size", "llm.intermediate_size", "vision.depth", "vision.hidden_size", "vision.num_heads",
        "eva.width", "eva.layers", "eva.head_width", "eva.patch_size", "eva.image_size",
    ]
    # Every positive-by-nature integer of the registered head sections (widths, counts, sizes).
    positive += [f"{name}.{f.name}" for name in (*heads.VELOCITY_NETS, *(h for h in heads.HEADS if heads.HEADS[h].config))
                 for f in dataclasses.fields(COMPONENT_CONFIGS[name])
                 if f.type in ("int", int) and f.name not in ("multiple_of",)]
    for key in positive:
        _require(_get(m, key) > 0, "model." + key, f"must be > 0, got {_get(m, key)}")
    _require(m.n_query > 0, "model.n_query", f"must be > 0, got {m.n_query}")
    _require(m.query_init_std > 0, "model.query_init_std", f"must be > 0, got {m.query_init_std}")

    _require(llm.hidden_size % llm.num_attention_heads == 0, "model.llm.num_attention_heads",
             f"{llm.num_attention_heads} heads do not divide hidden_size {llm.hidden_size}")
    _require(llm.num_attention_heads % llm.num_key_value_heads == 0, "model.llm.num_key_value_heads",
             f"{llm.num_key_value_heads} must divide num_attention_heads {llm.num_attention_heads}")
    head_dim = llm.hidden_size // llm.num_attention_heads
    _require(sum(llm.mrope_section) * 2 == head_dim, "model.llm.mrope_section",
             f"{tuple(llm.mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    _require(vis.hidden_size % vis.num_heads == 0, "model.vision.num_heads",
             f"{vis.num_heads} heads do not divide hidden_size {vis.hidden_size}")
    _require(vis.out_hidden_size == llm.hidden_size, "model.vision.out_hidden_size",
             f"{vis.out_hidden_size} must equal model.llm.hidden_size {llm.hidden_size}")
    section = head_section(cfg)
    head = component(cfg, section)
    for field, problem in heads.check(m.gen_head, m.denoiser, head):
        raise ConfigError(f"config key 'model.{section}.{field}': {problem}")
    _require(head.latent_embedding_size == llm.hidden_size, f"model.{section}.latent_embedding_size",
             f"{head.latent_embedding_size} must equal model.llm.hidden_size {llm.hidden_size}")
    _require(eva.width % eva.head_width == 0, "model.eva.head_width",
             f"{eva.head_width} does not divide width {eva.width}")
    _require(eva.image_size % eva.patch_size == 0, "model.eva.patch_size",
             f"{eva.patch_size} must divide image_size {eva.image_size}")
    _require(sig.hidden_size % sig.num_attention_heads == 0, "model.siglip2.num_attention_heads",
             f"{sig.num_attention_heads} heads do not divide hidden_size {sig.hidden_size}")

    dec = m.decoder
    _require(dec.projection_class_embeddings_input_dim == dec.cross_attention_dim + 6 * dec.addition_time_embed_dim,
             "model.decoder.projection_class_embeddings_input_dim",
             f"must be cross_attention_dim + 6 * addition_time_embed_dim = "
             f"{dec.cross_attention_dim + 6 * dec.addition_time_embed_dim}")
    _require(len(dec.block_out_channels) == len(dec.down_block_types) == len(dec.up_block_types)
             == len(dec.transformer_layers_per_block) == len(dec.attention_head_dim),
             "model.decoder.block_out_channels", "block_out_channels, down/up_block_types, "
             "transformer_layers_per_block and attention_head_dim need one entry per level")
    if cfg.train.stage == "pipeline":  # the demo's pixel-space decoder on space_to_depth-packed pixels
        p = cfg.demo.decoder_pixel_patch
        _require(p >= 1, "demo.decoder_pixel_patch", f"{p} must be >= 1")
        for key in ("eval_questions", "eval_prompts", "eval_decoder_steps"):
            _require(cfg.demo[key] >= 1, f"demo.{key}", f"{cfg.demo[key]} must be >= 1")
        _require(dec.in_channels == dec.out_channels == 3 * p * p, "model.decoder.in_channels",
                 f"in/out channels {dec.in_channels}/{dec.out_channels} must be 3 * demo.decoder_pixel_patch**2 "
                 f"= {3 * p * p} (RGB pixels packed {p}x{p})")
    if m.target_encoder == "eva_clip":
        _require(eva.pooling.startswith("early_pool2d_"), "model.eva.pooling",
                 f"{eva.pooling!r} is not one of ['early_pool2d_K']")
        k = int(eva.pooling.rsplit("_", 1)[1])
        grid = eva.image_size // eva.patch_size
        _require(grid % k == 0, "model.eva.pooling", f"pool {k} must divide the {grid}x{grid} token grid")
        _require(head.num_tokens == (grid // k) ** 2, f"model.{section}.input_size",
                 f"{head.num_tokens} target tokens must equal the pooled EVA grid {grid // k}x{grid // k}")
        _require(head.in_channels == eva.width, f"model.{section}.in_channels",
                 f"{head.in_channels} must equal model.eva.width {eva.width} (the target features)")
    elif m.target_encoder == "siglip2":
        _require(math.isqrt(sig.num_pooled_tokens) ** 2 == sig.num_pooled_tokens, "model.siglip2.num_pooled_tokens",
                 f"{sig.num_pooled_tokens} must be a square number")
        _require(sig.num_pooled_tokens == head.num_tokens, f"model.{section}.input_size",
                 f"{head.num_tokens} target tokens must equal model.siglip2.num_pooled_tokens {sig.num_pooled_tokens}")
        _require(head.in_channels == sig.hidden_size, f"model.{section}.in_channels",
                 f"{head.in_channels} must equal model.siglip2.hidden_size {sig.hidden_size}")

    for key in ("train.num_steps", "train.grad_accum", "train.log_every", "train.checkpoint_every",
                "train.keep_checkpoints", "data.global_batch_size", "data.max_length",
                "precompute.records_per_shard"):
        _require(_get(cfg, key) > 0, key, f"must be > 0, got {_get(cfg, key)}")
    _require(cfg.data.max_length > m.n_query + 1, "data.max_length",
             f"{cfg.data.max_length} leaves no room for text next to the {m.n_query + 1} image slots")
    _require(0.0 <= cfg.flow.cond_dropout < 1.0, "flow.cond_dropout", f"must be in [0, 1), got {cfg.flow.cond_dropout}")
    _require(cfg.flow.shift > 0, "flow.shift", f"must be > 0, got {cfg.flow.shift}")
    _require(cfg.flow.logit_std > 0, "flow.logit_std", f"must be > 0, got {cfg.flow.logit_std}")
    # The SD3 paper's range (eq. 20): beyond it the mode density is not monotone and leaves [0, 1].
    _require(-1.0 <= cfg.flow.mode_scale <= 2 / (math.pi - 2), "flow.mode_scale",
             f"must be in [-1, 2 / (pi - 2) = {2 / (math.pi - 2):.4f}], got {cfg.flow.mode_scale}")
    _require(0.0 <= cfg.train.warmup_ratio < 1.0, "train.warmup_ratio", f"must be in [0, 1), got {cfg.train.warmup_ratio}")
    for key in ("train.learning_rate", "demo.generation_learning_rate", "demo.decoder_learning_rate"):
        _require(_get(cfg, key) > 0, key, f"must be > 0, got {_get(cfg, key)}")
    _require(cfg.precompute.batch_size >= 0, "precompute.batch_size",
             f"must be >= 0, got {cfg.precompute.batch_size}")
    _validate_training_features(cfg)
    _validate_samples(cfg)

    if num_devices is not None:
        try:
            shape = resolve_mesh_shape(cfg.mesh, num_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        data_parallel = shape[0] * shape[1]
        _require(cfg.data.global_batch_size % data_parallel == 0, "data.global_batch_size",
                 f"{cfg.data.global_batch_size} must be divisible by mesh data*fsdp = {data_parallel}")
        _require(cfg.precompute.batch_size % data_parallel == 0, "precompute.batch_size",
                 f"{cfg.precompute.batch_size} must be divisible by mesh data*fsdp = {data_parallel}")
    return cfg
