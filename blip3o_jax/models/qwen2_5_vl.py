"""Qwen2.5-VL backbone of BLIP3-o in Flax NNX: the Qwen2 text decoder and the vision + text wrapper.

Ports transformers' ``Qwen2_5_VLForConditionalGeneration`` (reference sections 3.2, 4): token
embedding, Qwen2 decoder blocks (RMSNorm, grouped-query attention with q/k/v biases and no output bias,
SwiGLU MLP), final RMSNorm and a tied or untied LM head, with Qwen2.5-VL's multimodal RoPE (M-RoPE):
positions come as (3, B, L) (temporal, height, width); the rotary frequencies are split into
``mrope_section`` chunks, chunk i rotating by axis i. For text all three axes are equal, which is
exactly ordinary 1-D RoPE (rotate-half convention).

Module layout mirrors the PyTorch checkpoint so the mapping table (qwen_mapping.py) is mechanical:

    Qwen2_5_VL
      visual      QwenVisionTower (qwen_vision.py)          <- visual.*
      model       QwenTextModel: embed_tokens, layers, norm <- model.embed_tokens / model.layers.{i} / model.norm
      lm_head     absent when tie_word_embeddings           <- lm_head.weight

Decoder blocks are stacked along a leading 'layers' axis (nn.stack_layers) and run with ``lax.scan``. Two forward paths
share the blocks: ``hidden_states`` (whole sequences, causal, padding keys masked) and ``forward_cached``
(writes keys/values into a preallocated cache; used by blip3o_jax.decode for generation).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax.models import attention
from blip3o_jax.models import layers as nn
from blip3o_jax.models.attention import dot_product_attention
from blip3o_jax.models.qwen_vision import QwenVisionConfig, QwenVisionTower, get_rope_index


@dataclasses.dataclass(frozen=True)
class QwenTextConfig:
    """transformers Qwen2.5-VL text field names; defaults = Qwen2.5-VL-7B-Instruct resized for BLIP3-o."""

    vocab_size: int = 151668
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple = (16, 24, 24)
    tie_word_embeddings: bool = False
    attention: str = ""  # backend (models/attention.py); "" = model.attention


# Released Qwen2.5 special-token ids (docs/model.md 4.3); the demo's tiny vocabulary overrides them.
IMAGE_TOKEN_ID = 151655  # <|image_pad|>
VISION_START_TOKEN_ID = 151652  # <|vision_start|>



class TokenIdError(ValueError):
    """A token id outside the embedding table.

    ``nnx.Embed`` gathers with ``jnp.take``, whose out-of-range mode fills the row with NaN instead of
    failing (and a NaN in a padding key still reaches every query through the attention's weighted sum
    of values), so one bad id - typically a pad id from another vocabulary - silently turns a whole
    forward pass into NaN. Traced code cannot look at values, so every public host-side entry point
    checks its ids with ``check_token_ids`` before any device work."""


def check_token_ids(ids, vocab_size: int, source: str, *, ignore_negative: bool = False) -> np.ndarray:
    """Returns ``ids`` as a numpy array after checking every entry is in [0, vocab_size).

    ``source`` says where the ids came from (argument, config key, batch) for the error message;
    ``ignore_negative`` skips negative entries (labels, where -100 marks positions without a loss).
    Raises TokenIdError naming the offending ids, where the first one sits, and the vocabulary size."""
    if isinstance(ids, jax.core.Tracer):
        raise TypeError(f"{source}: token ids must be concrete (host) values to be checked; call the entry point "
                        "outside jit")
    arr = np.asarray(ids)
    if arr.size == 0:  # an empty prompt ([] is float64 to numpy)
        return arr.astype(np.int32)
    if arr.dtype.kind not in "iub":
        raise TokenIdError(f"{source}: token ids must be integers, got dtype {arr.dtype}")
    bad = arr >= vocab_size
    if not ignore_negative:
        bad |= arr < 0
    if bad.any():
        values = np.unique(arr[bad])
        shown = ", ".join(str(int(v)) for v in values[:8])
        if len(values) > 8:
            shown += f", ... ({len(values)} distinct)"
        where = f" (first at index {tuple(int(i) for i in np.argwhere(bad)[0])} of shape {arr.shape})" if arr.ndim else ""
        raise TokenIdError(f"{source}: token id(s) {shown} outside the embedding table of {vocab_size} rows "
                           f"(valid ids 0..{vocab_size - 1}){where}; JAX's gather would read NaN there")
    return arr


# transformers initialises Linear kernels and embeddings with N(0, initializer_range=0.02).
_init = nnx.initializers.normal(0.02)


def _check_text_config(cfg: QwenTextConfig) -> int:
    """Returns head_dim after checking the sizes fit together."""
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {cfg.num_attention_heads} is not divisible by num_key_value_heads {cfg.num_key_value_heads}"
        )
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if head_dim % 2 or sum(cfg.mrope_section) != head_dim // 2:
        raise ValueError(f"mrope_section {tuple(cfg.mrope_section)} must sum to head_dim/2 = {head_dim // 2}")
    return head_dim


# ---------------------------------------------------------------------------------------------
# Multimodal RoPE


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, mrope_section) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables (B, L, head_dim) in float32 from M-RoPE positions (3, B, L).

    Frequency j (of head_dim/2) rotates by the position of axis ``a(j)``, where the first
    mrope_section[0] frequencies use the temporal axis, the next mrope_section[1] the height axis and
    the last mrope_section[2] the width axis (transformers' ``recomposition_frequencies``).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    axis_of_freq = np.repeat(np.arange(3), mrope_section)  # (head_dim/2,)
    pos = jnp.moveaxis(jnp.asarray(position_ids), 0, -1).astype(jnp.float32)  # (B, L, 3)
    freqs = pos[..., axis_of_freq] * jnp.asarray(inv_freq, jnp.float32)  # (B, L, head_dim/2)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on (B, L, heads, head_dim) with (B, L, head_dim) tables, in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def text_position_ids(attention_mask: jax.Array) -> jax.Array:
    """M-RoPE positions (3, B, L) for text: each row counts its real tokens (padding gets 0).

    Equal to ``arange(L)`` without padding and for right padding; with left padding the first real
    token gets position 0, as in transformers' generate() and 4.51's get_rope_index.
    """
    mask = jnp.asarray(attention_mask).astype(jnp.int32)
    pos = jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


# ---------------------------------------------------------------------------------------------
# Decoder block


class Attention(nnx.Module):
    def __init__(self, cfg: QwenTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.head_dim = _check_text_config(cfg)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        h, kv = cfg.hidden_size, cfg.num_key_value_heads * self.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=_init)
        self.q_proj = nn.linear(h, h, ("embed", "heads"), **kw)
        self.k_proj = nn.linear(h, kv, ("embed", "kv"), **kw)
        self.v_proj = nn.linear(h, kv, ("embed", "kv"), **kw)
        self.o_proj = nn.linear(h, h, ("heads", "embed"), use_bias=False, **kw)
        self.attention = attention.check_implementation(cfg.attention, "model.llm.attention")

    def __call__(self, x, cos, sin, visible: dict, cache=None, cache_index=None):
        """x (B, L, H). Without cache: attends within x. With cache (k, v each (B, S, Hkv, D)): writes
        this chunk's keys/values at slots [cache_index, cache_index + L) and attends over all S slots.
        ``visible``: the masking arguments of dot_product_attention (causal, positions, segment ids)."""
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            cache = (k, v)
        out = dot_product_attention(q, k, v, **visible, implementation=self.attention)
        return self.o_proj(out.reshape(b, l, -1)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: QwenTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=_init, use_bias=False)
        self.gate_proj = nn.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = nn.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = nn.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs, **kw)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, visible: dict, cache=None, cache_index=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, visible, cache, cache_index)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


# ---------------------------------------------------------------------------------------------
# Text model (torch ``model.*``)


class QwenTextModel(nnx.Module):
    """embed_tokens -> scanned decoder layers -> final norm (torch ``Qwen2_5_VLTextModel``)."""

    def __init__(self, cfg: QwenTextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.head_dim = _check_text_config(cfg)
        self.dtype = dtype
        self.remat = remat
        nn.remat_policy(remat)  # fail early on an unknown policy name
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(_init, ("vocab", "embed")), rngs=rngs,
        )
        self.layers = nn.stack_layers(
            lambda r: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.num_hidden_layers, rngs
        )
        self.norm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)

    def rope(self, position_ids):
        return mrope_cos_sin(position_ids, self.head_dim, self.cfg.rope_theta, self.cfg.mrope_section)

    def __call__(self, inputs_embeds, attention_mask, position_ids):
        """Final-norm hidden states (B, L, H). attention_mask (B, L) (1 = real token), positions (3, B, L)."""
        # Padding keys are invisible (segment -1); every query is in segment 0, as transformers masks
        # keys only.
        visible = dict(causal=True, kv_segment_ids=jnp.where(jnp.asarray(attention_mask) > 0, 0, -1))
        cos, sin = self.rope(position_ids)
        x, _ = nn.scan_blocks(
            self.layers, inputs_embeds.astype(self.dtype), remat=self.remat,
            block_call=lambda block, h, _: (block(h, cos, sin, visible)[0], None),
        )
        return self.norm(x)

    def forward_cached(self, inputs_embeds, position_ids, cache: dict, cache_index):
        """Runs a chunk of L tokens that occupies cache slots [cache_index, cache_index + L).

        cache: {'k', 'v': (layers, B, S, Hkv, D), 'valid': (B, S) bool}, where ``valid`` already marks
        the slots of this chunk (and earlier real tokens). Returns (final-norm states (B, L, H), cache).
        """
        length = inputs_embeds.shape[1]
        # Causal over cache slots (the chunk sits at [cache_index, cache_index + L)); unwritten or
        # padding slots are segment -1, so a key is visible iff it is valid and not after the query.
        visible = dict(
            causal=True,
            q_positions=cache_index + jnp.arange(length),
            kv_positions=jnp.arange(cache["valid"].shape[1]),
            kv_segment_ids=jnp.where(cache["valid"], 0, -1),
        )
        cos, sin = self.rope(position_ids)

        x, (k, v) = nn.scan_blocks(
            self.layers, inputs_embeds.astype(self.dtype), (cache["k"], cache["v"]),
            block_call=lambda block, h, kv: block(h, cos, sin, visible, kv, cache_index),
        )
        return self.norm(x), dict(cache, k=k, v=v)

    def init_cache(self, batch: int, max_length: int, dtype=None) -> dict:
        """Empty KV cache for ``batch`` sequences of up to ``max_length`` tokens."""
        shape = (self.cfg.num_hidden_layers, batch, max_length, self.cfg.num_key_value_heads, self.head_dim)
        dtype = dtype or self.dtype
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_length), bool),
        }


# ---------------------------------------------------------------------------------------------
# Vision + text (torch ``Qwen2_5_VLForConditionalGeneration``)


def scatter_image_embeds(inputs_embeds: jax.Array, input_ids: jax.Array, image_embeds: jax.Array,
                         image_token_id: int) -> jax.Array:
    """Writes image_embeds (N, H) in order at the N image-pad positions of input_ids (B, L), row-major
    over the batch, like transformers' ``masked_scatter``. Jit-friendly (no data-dependent shapes)."""
    is_image = jnp.asarray(input_ids) == image_token_id
    index = jnp.cumsum(is_image.reshape(-1)) - 1
    gathered = image_embeds[jnp.clip(index, 0, image_embeds.shape[0] - 1)].reshape(inputs_embeds.shape)
    return jnp.where(is_image[..., None], gathered.astype(inputs_embeds.dtype), inputs_embeds)


@nnx.jit
def _text_logits(model: "Qwen2_5_VL", inputs_embeds, attention_mask, position_ids):
    return model.logits(model.hidden_states(inputs_embeds, attention_mask, position_ids))


@functools.partial(nnx.jit, static_argnums=(2,))
def _vision_forward(visual, pixel_values, grid: tuple):
    """The vision tower as one compiled program per image grid (``multimodal_inputs`` runs outside jit;
    op by op it cost 0.6 s per call for the demo's 2-layer ViT, most of the demo's understanding eval)."""
    return visual(pixel_values, np.asarray(grid))


class Qwen2_5_VL(nnx.Module):
    """Qwen2.5-VL: optional vision tower ``visual``, text decoder ``model``, LM head ``lm_head``.

    ``vision_cfg=None`` builds the text-only backbone (BLIP3-o's text-to-image path needs no ViT).
    """

    def __init__(
        self,
        text_cfg: QwenTextConfig,
        vision_cfg: QwenVisionConfig | None = None,
        *,
        image_token_id: int = IMAGE_TOKEN_ID,
        vision_start_token_id: int = VISION_START_TOKEN_ID,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.text_cfg, self.vision_cfg = text_cfg, vision_cfg
        self.image_token_id, self.vision_start_token_id = image_token_id, vision_start_token_id
        if vision_cfg is not None:
            if vision_cfg.out_hidden_size != text_cfg.hidden_size:
                raise ValueError(
                    f"vision out_hidden_size {vision_cfg.out_hidden_size} != text hidden_size {text_cfg.hidden_size}"
                )
            self.visual = QwenVisionTower(vision_cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        else:
            self.visual = None
        self.model = QwenTextModel(text_cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs)
        if text_cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.linear(
                text_cfg.hidden_size, text_cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                dtype=dtype, param_dtype=param_dtype, kernel_init=_init, rngs=rngs,
            )

    # -- pieces -------------------------------------------------------------------------------

    def check_ids(self, ids, source: str, **kw) -> np.ndarray:
        """``check_token_ids`` against this model's embedding table (host-side; see TokenIdError)."""
        return check_token_ids(ids, self.text_cfg.vocab_size, source, **kw)

    def embed(self, input_ids) -> jax.Array:
        """Token embeddings (B, L, H). Traced callers check their ids first (check_ids, on the host)."""
        return self.model.embed_tokens(jnp.asarray(input_ids))

    def hidden_states(self, inputs_embeds, attention_mask=None, position_ids=None) -> jax.Array:
        """Final-norm hidden states (B, L, H) of the causal decoder.

        attention_mask (B, L), 1 for real tokens (default: all ones). position_ids (3, B, L) M-RoPE
        positions, or (B, L) text positions (default: counted from the mask, see text_position_ids).
        """
        b, length = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if position_ids is None:
            position_ids = text_position_ids(attention_mask)
        position_ids = jnp.asarray(position_ids)
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3,) + position_ids.shape)
        return self.model(inputs_embeds, attention_mask, position_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """LM-head logits (B, L, V) from final-norm hidden states; tied heads reuse embed_tokens."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def multimodal_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """(inputs_embeds (B, L, H), attention_mask (B, L), position_ids (3, B, L), rope_deltas (B, 1)).

        Without images: token embeddings, text positions, zero deltas. With images: ViT features written
        at the image-pad positions and positions from get_rope_index (3-D for image tokens).
        """
        input_ids = self.check_ids(input_ids, "input_ids")  # every id, padding included (see TokenIdError)
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, np.int32)
        attention_mask = np.asarray(attention_mask)
        embeds = self.embed(input_ids)
        if pixel_values is None:
            positions = text_position_ids(attention_mask)
            deltas = np.zeros((input_ids.shape[0], 1), np.int64)
            return embeds, attention_mask, positions, deltas

        if self.visual is None:
            raise ValueError("this backbone was built without a vision tower (vision_cfg=None)")
        image_grid_thw = np.asarray(image_grid_thw).reshape(-1, 3)
        merge = self.vision_cfg.spatial_merge_size
        n_features = int(image_grid_thw.prod(1).sum()) // merge**2
        n_tokens = int((input_ids == self.image_token_id).sum())
        if n_tokens != n_features:
            raise ValueError(f"{n_tokens} image-pad tokens in input_ids but image_grid_thw gives {n_features} image tokens")
        # Host-side positions first: they also check that every image's tokens are where the grid says.
        positions, deltas = get_rope_index(
            input_ids, image_grid_thw, attention_mask, spatial_merge_size=merge,
            image_token_id=self.image_token_id, vision_start_token_id=self.vision_start_token_id,
        )
        features = _vision_forward(self.visual, jnp.asarray(pixel_values), tuple(map(tuple, image_grid_thw.tolist())))
        embeds = scatter_image_embeds(embeds, input_ids, features, self.image_token_id)
        return embeds, attention_mask, jnp.asarray(positions), np.asarray(deltas)

    def lm_logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Causal-LM logits (B, L, V) = transformers ``Qwen2_5_VLForConditionalGeneration(...).logits``.

        pixel_values / image_grid_thw in the Hugging Face Qwen2.5-VL processor layout. Text positions
        count real tokens (left padding is handled as in generation).
        """
        embeds, mask, positions, _ = self.multimodal_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        return _text_logits(self, embeds, jnp.asarray(mask), positions)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        return self.lm_logits(input_ids, attention_mask, pixel_values, image_grid_thw)


__all__ = [
    "TokenIdError",
    "check_token_ids",
    "QwenTextConfig",
    "QwenTextModel",
    "Qwen2_5_VL",
    "mrope_cos_sin",
    "apply_rope",
    "text_position_ids",
    "scatter_image_embeds",
]
