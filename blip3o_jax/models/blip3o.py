"""The unified BLIP3-o model (reference sections 2, 3; contract section 2).

``Blip3o`` holds the Qwen2.5-VL backbone, the ``n_query`` learned queries, the generation head and the
(optional) target encoder, and exposes the contract's five methods: ``lm_logits``, ``condition``,
``velocity``, ``target_features`` and ``sample_features``. The training losses of each stage and the
helpers the trainer needs (born-sharded construction, trainable filters, analytic FLOPs) live here too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import configlib, flops, sharding
from blip3o_jax.data.qwen_image_processor import smart_resize
from blip3o_jax.models import heads as heads_lib
from blip3o_jax.models import layers as bnn
from blip3o_jax.models.eva_clip import EvaVisionTransformer
from blip3o_jax.models.flow import FlowConfig
from blip3o_jax.models.qwen2_5_vl import Qwen2_5_VL, TokenIdError, check_token_ids, scatter_image_embeds
from blip3o_jax.models.qwen_vision import get_rope_index
from blip3o_jax.models.siglip2 import Siglip2VisionModel


@dataclasses.dataclass(frozen=True)
class Blip3oConfig:
    """Everything the model needs, as plain frozen dataclasses (built from config.model by from_config)."""

    llm: Any
    vision: Any | None
    head: Any  # the config dataclass of the generation head's section (DiTConfig for the released head)
    eva: Any
    siglip2: Any
    n_query: int = 64
    query_init_std: float = 1.0
    gen_head: str = "flow"
    denoiser: str = "dit"
    target_encoder: str = "eva_clip"
    gen_start_token_id: int = 151665
    image_pad_token_id: int = 151655
    vision_start_token_id: int = 151652
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "full"
    flow: FlowConfig = FlowConfig()

    @classmethod
    def from_config(cls, cfg) -> "Blip3oConfig":
        m = cfg.model
        return cls(
            llm=configlib.component(cfg, "llm"),
            vision=configlib.component(cfg, "vision"),
            head=configlib.head_config(cfg),
            eva=configlib.component(cfg, "eva"),
            siglip2=configlib.component(cfg, "siglip2"),
            n_query=m.n_query,
            query_init_std=m.query_init_std,
            gen_head=m.gen_head,
            denoiser=m.denoiser,
            target_encoder=m.target_encoder,
            gen_start_token_id=m.gen_start_token_id,
            image_pad_token_id=m.image_pad_token_id,
            vision_start_token_id=m.vision_start_token_id,
            dtype=m.dtype,
            param_dtype=m.param_dtype,
            remat=m.remat,
            flow=FlowConfig.from_config(cfg.flow),
        )


class Blip3o(nnx.Module):
    def __init__(self, cfg: Blip3oConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = bnn.dtype_of(cfg.dtype), bnn.dtype_of(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, rngs=rngs)
        self.backbone = Qwen2_5_VL(
            cfg.llm, cfg.vision, image_token_id=cfg.image_pad_token_id,
            vision_start_token_id=cfg.vision_start_token_id, **kw,
        )
        # torch.randn init (std 1, not scaled), docs/model.md 4.5 (config.model.query_init_std).
        self.latent_queries = bnn.param(
            rngs, nnx.initializers.normal(cfg.query_init_std), (1, cfg.n_query, cfg.llm.hidden_size), (None, "queries", "embed"),
            param_dtype,
        )
        self.gen_head = heads_lib.build_head(cfg.gen_head, cfg.head, denoiser=cfg.denoiser, n_query=cfg.n_query,
                                             flow_cfg=cfg.flow, **kw)
        if cfg.target_encoder == "eva_clip":
            self.target_encoder = EvaVisionTransformer(cfg.eva, **kw)
        elif cfg.target_encoder == "siglip2":
            self.target_encoder = Siglip2VisionModel(cfg.siglip2, **kw)
        else:
            self.target_encoder = None

    # ---- contract methods ----------------------------------------------------------------------

    def lm_logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        input_ids = self.backbone.check_ids(input_ids, "Blip3o.lm_logits input_ids")
        return self.backbone.lm_logits(input_ids, attention_mask, pixel_values, image_grid_thw)

    def condition(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Text-to-image conditioning (docs/model.md 3.1 steps 2-4): (B, n_query, H) final-norm states.

        The marker id and the queries are appended after the whole (padded) prompt; their positions
        count only real tokens and padding is masked out of attention, so each row sees exactly
        ``prompt, [IMG], q_1 .. q_n`` at positions ``0 .. L_i + n`` as in the batch-1 reference, for
        left and right padding alike.

        With ``pixel_values`` / ``image_grid_thw`` (Hugging Face processor layout, docs/model.md 3.3a) the
        Qwen ViT features are written at the image-pad positions of ``input_ids``; positions stay 1-D
        (token counts, no M-RoPE image positions), as in the reference's image-conditioned path.
        """
        # Host-side, before jit: every id (padding included; see TokenIdError). The marker id was checked
        # when the model was built (check_config_token_ids).
        input_ids = jnp.asarray(self.backbone.check_ids(input_ids, "Blip3o.condition input_ids"))
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        image_embeds = None
        if pixel_values is not None:
            if self.backbone.visual is None:
                raise ValueError("image-conditioned generation needs the Qwen vision tower (model.vision)")
            grid = np.asarray(image_grid_thw).reshape(-1, 3)
            n_features = int(grid.prod(1).sum()) // self.backbone.vision_cfg.spatial_merge_size**2
            n_tokens = int(np.sum(np.asarray(input_ids) == self.cfg.image_pad_token_id))
            if n_tokens != n_features:
                raise ValueError(f"{n_tokens} image-pad tokens in input_ids but image_grid_thw gives {n_features}")
            image_embeds = self.backbone.visual(jnp.asarray(pixel_values), grid)
        return _condition(self, input_ids, jnp.asarray(attention_mask), image_embeds)

    def velocity(self, x, t, z) -> jax.Array:
        return self.gen_head.velocity(jnp.asarray(x), jnp.asarray(t), jnp.asarray(z))

    def target_features(self, images) -> jax.Array:
        if self.target_encoder is None:
            raise ValueError("this model has no target encoder (model.target_encoder = 'none')")
        return self.target_encoder.target_features(jnp.asarray(images))

    def sample_features(self, z, noise, num_steps: int = 30, guidance: float = 3.0) -> jax.Array:
        return self.gen_head.sample(jnp.asarray(z), jnp.asarray(noise), num_steps=num_steps, guidance=guidance)

    # ---- pieces used by training ---------------------------------------------------------------

    def query_states(self, input_ids, attention_mask, query_start) -> jax.Array:
        """Training form (docs/model.md 3.4): queries overwrite the embeddings of the n_query slots that
        start at ``query_start`` (B,); returns the final-norm states there (B, n_query, H)."""
        embeds = self.backbone.embed(input_ids)
        slots = query_start[:, None] + jnp.arange(self.cfg.n_query)[None]  # (B, n)
        rows = jnp.arange(input_ids.shape[0])[:, None]
        queries = jnp.broadcast_to(self.latent_queries[...].astype(embeds.dtype), (input_ids.shape[0],) + self.latent_queries.shape[1:])
        embeds = embeds.at[rows, slots].set(queries)
        hidden = self.backbone.hidden_states(embeds, attention_mask)
        return hidden[rows, slots]

    def generation_loss(self, batch: dict, rng: jax.Array) -> tuple[jax.Array, dict]:
        """Flow-matching (or MSE) loss on the target features of ``batch["target_image"]``, or on
        ``batch["target_features"]`` (B, N, C) precomputed by ``blip3o_jax.precompute`` (the target
        encoder is then not run). ``batch["condition"]`` (B, n_query, H), stored by precompute, replaces
        the backbone pass (the queries then get no gradient)."""
        x0, z = self.generation_inputs(batch)
        return self.gen_head.loss(jax.lax.stop_gradient(x0), z, rng), {}

    def generation_inputs(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(targets x0 (B, N, C) float32, condition z (B, n_query, H)) of a generation batch (see
        generation_loss)."""
        if "condition" in batch:
            z = jnp.asarray(batch["condition"])  # stored in float32: holds bf16 states exactly
        else:
            z = self.query_states(batch["input_ids"], batch["attention_mask"], batch["query_start"])
        if "target_features" in batch:
            x0 = jnp.asarray(batch["target_features"], jnp.float32)  # target_features() returns float32 too
        else:
            x0 = self.target_features(batch["target_image"])
        return x0, z

    def validation_losses(self, batch: dict, sigmas: jax.Array, rng: jax.Array) -> jax.Array:
        """(T,) the generation head's loss at each noise level of ``sigmas`` (T,) with one noise draw
        from ``rng`` and no condition dropout: deterministic, the validation loss (training.Validator)."""
        x0, z = self.generation_inputs(batch)
        noise = jax.random.normal(rng, x0.shape, jnp.float32)
        return self.gen_head.validation_losses(x0, z, sigmas, noise)

    def understanding_loss(self, batch: dict, image_grid: tuple | None = None) -> tuple[jax.Array, dict]:
        """Next-token cross-entropy on the answer tokens (labels != -100), float32.

        With images, ``batch['pixel_values']`` is (B, P, 1176) in the processor's patch layout and every
        sample has the same static ``image_grid`` (t, h, w) (fixed shapes under jit; see prepare_batch).
        """
        input_ids = batch["input_ids"]
        embeds = self.backbone.embed(input_ids)
        positions = None
        if image_grid is not None:
            b = input_ids.shape[0]
            pixels = batch["pixel_values"].reshape((-1, batch["pixel_values"].shape[-1]))
            feats = self.backbone.visual(pixels, np.tile(np.asarray(image_grid, np.int64), (b, 1)))
            embeds = scatter_image_embeds(embeds, input_ids, feats, self.cfg.image_pad_token_id)
            positions = jnp.swapaxes(batch["position_ids"], 0, 1)  # placed batch-first, see prepare_batch
        hidden = self.backbone.hidden_states(embeds, batch["attention_mask"], positions)
        logits = self.backbone.logits(hidden[:, :-1]).astype(jnp.float32)
        labels = batch["labels"][:, 1:]
        valid = labels >= 0
        # -log_softmax at the label = logsumexp - the label's logit, picked with a one-hot mask: the
        # gather of take_along_axis has a scatter as gradient, which XLA's CPU backend fuses with a
        # transposing copy of the (B, L, V) softmax gradient (the demo's understanding step: 2x slower loss).
        picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == labels[..., None], logits, 0.0), axis=-1)
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        count = jnp.maximum(jnp.sum(valid), 1)
        accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) * valid) / count
        return jnp.sum(nll * valid) / count, {"token_accuracy": accuracy}


@nnx.jit
def _condition(model: Blip3o, input_ids, attention_mask, image_embeds=None):
    b = input_ids.shape[0]
    n = model.cfg.n_query
    marker = model.backbone.embed(jnp.full((b, 1), model.cfg.gen_start_token_id, jnp.int32))
    embeds = model.backbone.embed(input_ids)
    if image_embeds is not None:
        embeds = scatter_image_embeds(embeds, input_ids, image_embeds, model.cfg.image_pad_token_id)
    queries = jnp.broadcast_to(model.latent_queries[...].astype(embeds.dtype), (b, n, embeds.shape[-1]))
    embeds = jnp.concatenate([embeds, marker, queries], axis=1)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((b, n + 1), jnp.int32)], axis=1)
    return model.backbone.hidden_states(embeds, mask)[:, -n:]


# ---------------------------------------------------------------------------------------------
# Construction, sharding and training helpers


def component_rules(cfg):
    """Parameter path -> the rule table of its component (config.sharding)."""
    tables = {name: sharding.rules_for(cfg.sharding[name]) for name in ("llm", "vision", "dit", "target")}

    def choose(path: tuple) -> sharding.Rules:
        if path[0] == "backbone":
            return tables["vision"] if len(path) > 1 and path[1] == "visual" else tables["llm"]
        if path[0] == "target_encoder":
            return tables["target"]
        return tables["dit"]  # gen_head and latent_queries

    return choose


# Which of the config's own token ids must have an embedding row, and when (check_config_token_ids).
# The model itself embeds only gen_start_token_id (the [IMG] marker ``condition`` appends to every
# prompt): no input check can catch it, so every model needs it. The vision ids say where a model with
# a Qwen ViT reads images (scatter_image_embeds, get_rope_index); one outside the vocabulary means the
# config lost the real ids (conversion.hf_config drops out-of-range ids on export, and a reader puts the
# released defaults back), so a model with a vision tower needs them. pad_token_id and query_token_id
# are fed only by the training samples (data/samples.py pads with pad and fills the query slots with
# query): fresh models for training (build_model) need them; a loaded model does not (inference pads with
# the tokenizer's own pad id, checked where used), so tiny checkpoints that keep the released
# pad / query defaults stay loadable. Every batch is checked as well (prepare_batch, Pipeline, decode).
_ALWAYS_IDS = ("gen_start_token_id",)
_VISION_IDS = ("image_pad_token_id", "vision_start_token_id", "vision_end_token_id")
_TRAINING_IDS = ("pad_token_id", "query_token_id")


def check_config_token_ids(cfg, *, training: bool = False, source: str = "config") -> None:
    """TokenIdError unless the config's token ids that this model feeds fit ``model.llm.vocab_size``
    (the rule above; ``training`` adds the ids of the training samples)."""
    m = cfg.model
    keys = _ALWAYS_IDS + (_VISION_IDS if m.get("vision") is not None else ()) + (_TRAINING_IDS if training else ())
    vocab = int(m.llm.vocab_size)
    bad = {k: int(m[k]) for k in keys if not 0 <= int(m[k]) < vocab}
    if bad:
        listed = ", ".join(f"model.{k} = {v}" for k, v in bad.items())
        raise TokenIdError(f"{source}: {listed} outside the embedding table of model.llm.vocab_size = {vocab} rows "
                           f"(valid ids 0..{vocab - 1}); JAX's gather would read NaN for it. Set the id(s) to the "
                           "tokenizer's ids for these tokens")


def build_model(cfg, mesh, seed: int | None = None) -> Blip3o:
    """A Blip3o with every parameter born sharded on ``mesh`` (one rule table per component), for
    training: the config's token ids are checked first (check_config_token_ids, training ids included)."""
    check_config_token_ids(cfg, training=True)
    mcfg = Blip3oConfig.from_config(cfg)
    seed = cfg.train.seed if seed is None else seed
    return sharding.create_sharded(lambda: Blip3o(mcfg, rngs=nnx.Rngs(seed)), mesh, component_rules(cfg))


def abstract_model(cfg, mesh):
    """(graphdef, abstract state with target shardings) without allocating anything (every loader builds
    through here, so the config's token ids are checked: check_config_token_ids)."""
    check_config_token_ids(cfg)
    mcfg = Blip3oConfig.from_config(cfg)
    return sharding.abstract_with_shardings(lambda: Blip3o(mcfg, rngs=nnx.Rngs(0)), mesh, component_rules(cfg))


def trainable_filter(stage: str, freeze_vision_tower: bool = False, freeze_latent_queries: bool = False):
    """Which parameters a stage trains; everything else is frozen (no gradients, no optimizer state).

    ``freeze_vision_tower`` (config.train.freeze_vision_tower) keeps the backbone's ViT and merger fixed
    in the stages that train the backbone, as LLaVA-style fine-tuning of a pretrained tower does.
    ``freeze_latent_queries`` (config.train.freeze_latent_queries) keeps the queries at their
    initial values, so the generation head learns a fixed condition (see configs/demo.py)."""
    head = nnx.PathContains("gen_head")
    if not freeze_latent_queries:
        head = nnx.Any(head, nnx.PathContains("latent_queries"))
    backbone = nnx.PathContains("backbone")
    if freeze_vision_tower:
        backbone = nnx.All(backbone, nnx.Not(nnx.PathContains("visual")))
    if stage in ("generation", "instruction"):
        return nnx.All(nnx.Param, head)
    if stage == "understanding":
        return nnx.All(nnx.Param, backbone)
    if stage == "joint":
        return nnx.All(nnx.Param, nnx.Any(head, backbone))
    raise ValueError(f"stage {stage!r} trains nothing; allowed: generation, instruction, understanding, joint")


def stage_trainable(cfg, stage: str):
    """``trainable_filter`` for ``stage`` with the freeze options of ``cfg.train``."""
    return trainable_filter(stage, cfg.train.freeze_vision_tower, cfg.train.freeze_latent_queries)


# Stages whose frozen parameters are stored in model.frozen_param_dtype: their frozen parts (the backbone
# with its ViT, the target encoder) only run forward, and no later stage of the recipe trains them from
# the finished stage's checkpoint (an understanding stage's frozen part is the trained generation head).
FROZEN_DTYPE_STAGES = ("generation", "instruction")


def frozen_param_dtype(cfg, stage: str) -> str:
    """The dtype ``stage`` stores its frozen parameters in: in the generation stages
    ``model.frozen_param_dtype`` ('compute' = ``model.dtype``), elsewhere ``model.param_dtype``.

    A frozen weight never receives an update, so a float32 master copy buys nothing: every matmul casts
    it to the compute dtype anyway (only norm scales and biases, applied in float32, see the rounding).
    The finished stage's ``params/`` stores them in this dtype too: the weights the stage trained with."""
    m = cfg.model
    if stage not in FROZEN_DTYPE_STAGES:
        return m.param_dtype
    return m.dtype if m.frozen_param_dtype == "compute" else m.frozen_param_dtype


def cast_frozen(cfg, stage: str, frozen):
    """``frozen`` (an nnx.State of arrays or of ShapeDtypeStructs) with its floating leaves in
    ``frozen_param_dtype(cfg, stage)``; shardings kept. Integer leaves (none today) are left alone."""
    dtype = jnp.dtype(bnn.dtype_of(frozen_param_dtype(cfg, stage)))

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return jax.jit(lambda a: a.astype(dtype), out_shardings=x.sharding)(x)

    return jax.tree.map(cast, frozen)


def stage_loss(model: Blip3o, stage: str, batch: dict, rng: jax.Array, image_grid=None) -> tuple[jax.Array, dict]:
    if stage in ("generation", "instruction"):
        return model.generation_loss(batch, rng)
    if stage == "understanding":
        return model.understanding_loss(batch, image_grid)
    if stage == "joint":
        gen, gen_aux = model.generation_loss(batch, rng)
        und, und_aux = model.understanding_loss(batch, image_grid)
        return gen + und, {"generation_loss": gen, "understanding_loss": und, **gen_aux, **und_aux}
    raise ValueError(f"unknown stage {stage!r}")


def check_batch_ids(host: dict, cfg, source: str = "training batch") -> None:
    """TokenIdError / ValueError for a host batch whose token ids, labels or query slots fall outside
    the model (the jitted step cannot check: see TokenIdError). Numpy on the host, a few microseconds."""
    vocab = int(cfg.model.llm.vocab_size)
    if "input_ids" in host:
        _check_with_hint(host["input_ids"], vocab, f"{source}: input_ids", cfg)
    if "labels" in host:  # negative labels (-100) carry no loss
        _check_with_hint(host["labels"], vocab, f"{source}: labels", cfg, ignore_negative=True)
    if "query_start" in host and "input_ids" in host:
        start, length = np.asarray(host["query_start"]), np.asarray(host["input_ids"]).shape[1]
        bad = (start < 0) | (start + cfg.model.n_query > length)
        if bad.any():
            raise ValueError(f"{source}: query_start {sorted(set(start[bad].tolist()))} puts the {cfg.model.n_query} "
                             f"query slots outside rows of {length} tokens")


def _check_with_hint(ids, vocab: int, source: str, cfg, **kw) -> None:
    """check_token_ids, naming the config keys that hold an offending id (samples.py writes them)."""
    arr = np.asarray(ids)
    outside = (arr >= vocab) if kw.get("ignore_negative") else (arr >= vocab) | (arr < 0)
    bad = set(np.unique(arr[outside]).tolist())
    keys = [f"model.{k}" for k in _ALWAYS_IDS + _VISION_IDS + _TRAINING_IDS if int(cfg.model[k]) in bad]
    check_token_ids(arr, vocab, source + (f" (the id of {', '.join(keys)})" if keys else ""), **kw)


def prepare_batch(host: dict, cfg, source: str = "training batch") -> tuple[dict, tuple | None]:
    """Host-side (numpy) work before a batch is placed on the mesh: the id checks (check_batch_ids;
    ``source`` names the batch in its errors), M-RoPE positions for image samples (placed batch-first)
    and the static per-sample image grid the jitted step is built for.
    Returns (numeric batch, image grid or None)."""
    host = {k: v for k, v in host.items() if np.asarray(v).dtype.kind in "biuf"}
    check_batch_ids(host, cfg, source)
    if "pixel_values" not in host:
        return host, None
    grids = np.asarray(host.pop("image_grid_thw"))
    num_patches = np.asarray(host.pop("num_patches"))
    if (grids != grids[0]).any() or (num_patches != host["pixel_values"].shape[1]).any():
        raise ValueError("understanding batches need one image size per run (fixed shapes under jit); got grids "
                         f"{np.unique(grids, axis=0).tolist()} - set config.data.und_image_size/max_patches")
    m = cfg.model
    positions, _ = get_rope_index(host["input_ids"], grids, host["attention_mask"],
                                  spatial_merge_size=m.vision.spatial_merge_size,
                                  image_token_id=m.image_pad_token_id, vision_start_token_id=m.vision_start_token_id)
    host["position_ids"] = np.ascontiguousarray(np.swapaxes(positions, 0, 1))
    return host, tuple(int(v) for v in grids[0])


def param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def step_flops(cfg, stage: str, n_trainable: int, precomputed: bool = False) -> float:
    """Analytic FLOPs of one optimizer step (flops.py conventions: weight matmuls plus attention's score
    and value matmuls; embedding lookups are free). ``precomputed``: the batches carry precomputed target
    features (``blip3o_jax.precompute``), so no target-encoder forward pass runs. The generation head
    counts itself (heads.forward_flops). Counted: the LLM's decoder layers over every token, the LM head
    on the understanding loss's positions, the Qwen ViT (patch embedding, blocks, merger) on the
    understanding images, the target encoder, the head. tests/test_plan_tpu.py checks the total against
    XLA's compiled FLOPs."""
    del n_trainable  # the counts come from the abstract model
    _, abstract = abstract_model(cfg, sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    m = cfg.model
    b, length = cfg.data.global_batch_size, cfg.data.max_length
    text = abstract["backbone"]["model"]
    decoder_params = param_count(text["layers"])
    mode_factor = {"forward": 1, "backprop": 2, "train": 3}

    def llm(mode: str) -> float:
        return (flops.dense_flops(decoder_params, b * length, mode)
                + flops.attention_flops(m.llm.num_hidden_layers, length, m.llm.hidden_size, b, mode))

    total = 0.0
    if stage in ("generation", "instruction", "joint"):
        # Gradients flow back through the LLM to trainable queries; frozen ones need its forward pass only.
        total += llm("train" if stage == "joint" else "forward" if cfg.train.freeze_latent_queries else "backprop")
        head = heads_lib.forward_flops(m.gen_head, m.denoiser, configlib.head_config(cfg), m.n_query,
                                       param_count(abstract["gen_head"]))
        total += mode_factor["train"] * b * head
        if "target_encoder" in abstract and not precomputed:
            if m.target_encoder == "eva_clip":
                tokens, layers, width = (m.eva.image_size // m.eva.patch_size) ** 2 + 1, m.eva.layers, m.eva.width
            else:
                tokens, layers, width = m.siglip2.num_patches, m.siglip2.num_hidden_layers, m.siglip2.hidden_size
            total += (flops.dense_flops(param_count(abstract["target_encoder"]), b * tokens, "forward")
                      + flops.attention_flops(layers, tokens, width, b, "forward"))
    if stage in ("understanding", "joint"):
        if stage == "understanding":
            total += llm("train")
        # The LM head (tied: the embedding matrix) on the L - 1 positions that predict a next token.
        total += flops.dense_flops(m.llm.hidden_size * m.llm.vocab_size, b * (length - 1), "train")
    if stage == "understanding" and m.get("vision") is not None and "visual" in abstract["backbone"]:
        total += vision_flops(cfg, abstract["backbone"]["visual"], b,
                              "forward" if cfg.train.freeze_vision_tower else "train")
    return total


def vision_flops(cfg, visual, batch: int, mode: str) -> float:
    """The Qwen ViT on ``batch`` understanding images of the run's one grid: patch embedding and blocks
    over every patch, the merger over each spatial_merge_size**2 group. Attention runs per image (the
    tower batches images of one grid), over all of its patches in every layer (windows are told apart by
    segment ids, so on xla the masked pairs are computed too): patches**2 per layer and image."""
    v = cfg.model.vision
    per_image = understanding_grid(cfg)[1]
    patches = batch * per_image
    merger = param_count(visual["merger"])
    dense = (flops.dense_flops(param_count(visual) - merger, patches, mode)
             + flops.dense_flops(merger, patches // v.spatial_merge_size**2, mode))
    return dense + flops.attention_flops(v.depth, per_image, v.hidden_size, batch, mode)


def understanding_grid(cfg) -> tuple[tuple[int, int, int], int]:
    """(image grid (t, h, w), patches per sample) of the understanding images: data.und_image_size squares
    through the Qwen processor's resize (data/samples.UnderstandingTransform). The trainer needs one grid
    per run (prepare_batch), so data.max_patches, when set, must be that grid's patch count."""
    d, vision = cfg.data, cfg.model.vision
    factor = vision.patch_size * vision.spatial_merge_size
    h, w = smart_resize(d.und_image_size, d.und_image_size, factor, d.min_pixels, d.max_pixels)
    grid = (1, h // vision.patch_size, w // vision.patch_size)
    return grid, grid[1] * grid[2]
