"""Autoregressive text generation for the Qwen2.5-VL backbone with a preallocated KV cache.

Used by image understanding (docs/model.md 3.2: greedy decoding of the answer after an image + question
prompt). The whole loop is one jitted function: a prefill over the prompt, then ``lax.while_loop``
decode steps that each feed one token. To compile once per (batch, prompt bucket, max_new_tokens),
prompts are left-aligned into a fixed bucket length (padding on the left, masked out), and the cache
has the fixed length ``bucket + max_new_tokens``.

Positions follow transformers' ``generate``: the prompt's own M-RoPE positions (3-D for image tokens,
see qwen_vision.get_rope_index), then generated token k sits at ``real prompt tokens + rope_delta + k``
on all three axes (rope_delta = 0 for text-only prompts). Rows stop at any of ``eos_token_ids``; after
that they are filled with ``pad_token_id`` (as transformers does), and the loop ends once every row
has stopped.

A ``repetition_penalty`` p != 1 acts as transformers' ``RepetitionPenaltyLogitsProcessor`` (applied to the
raw logits, before temperature and top-p): for every token id already in the row's sequence (prompt
included, padding excluded), a logit < 0 becomes logit * p, any other logit / p.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= length (beyond the largest: the next multiple of it)."""
    for b in sorted(buckets):
        if length <= b:
            return b
    top = max(buckets)
    return -(-length // top) * top


def left_align(input_ids, attention_mask, length: int, pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's real tokens (mask 1) to the right end of a (B, length) array.

    Accepts left- or right-padded input; the output is left-padded, so the last slot of every row is
    its last prompt token and generated tokens follow it directly in the cache.
    """
    input_ids = np.asarray(input_ids)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    out_ids = np.full((input_ids.shape[0], length), pad_token_id, input_ids.dtype)
    out_mask = np.zeros((input_ids.shape[0], length), np.int32)
    for b in range(input_ids.shape[0]):
        real = input_ids[b][mask[b]]
        if len(real) == 0:
            raise ValueError(f"prompt row {b} has no tokens")
        if len(real) > length:
            raise ValueError(f"prompt row {b} has {len(real)} tokens, more than the bucket length {length}")
        out_ids[b, length - len(real):] = real
        out_mask[b, length - len(real):] = 1
    return out_ids, out_mask


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches top_p (nucleus); the most
    likely token is always kept. Others get -inf."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor: logits (B, V), seen (B, V) bool."""
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def _next_token(logits, key, temperature, top_p, greedy: bool, seen=None, penalty=None):
    logits = logits.astype(jnp.float32)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, penalty)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(logits / temperature, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_token_ids", "pad_token_id", "greedy", "penalize")
)
def _generate(graphdef, state, embeds, mask, positions, next_position, key, temperature, top_p, ids, penalty, *,
              max_new_tokens: int, eos_token_ids: tuple[int, ...], pad_token_id: int, greedy: bool,
              penalize: bool = False):
    model = nnx.merge(graphdef, state)
    text = model.model
    batch, prompt_len, _ = embeds.shape
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

    # Prefill: the prompt fills cache slots [0, prompt_len); its last slot predicts the first token.
    cache = text.init_cache(batch, prompt_len + max_new_tokens)
    cache["valid"] = cache["valid"].at[:, :prompt_len].set(mask.astype(bool))
    hidden, cache = text.forward_cached(embeds, positions, cache, 0)
    key, sub = jax.random.split(key)
    logits = model.logits(hidden[:, -1])
    rows = jnp.arange(batch)
    seen = None
    if penalize:  # (B, V): which ids the row's sequence holds so far (the prompt's real tokens first)
        seen = jnp.zeros(logits.shape, jnp.int32).at[rows[:, None], ids].max(mask.astype(jnp.int32)) > 0
    token = _next_token(logits, sub, temperature, top_p, greedy, seen, penalty)
    tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    done = jnp.isin(token, eos)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        # Feed token step-1 (cache slot prompt_len + step - 1) and pick token `step`.
        step, token, tokens, cache, done, key, seen = carry
        if penalize:
            seen = seen.at[rows, token].set(True)
        slot = prompt_len + step - 1
        cache["valid"] = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones((batch, 1), bool), (0, slot))
        pos = jnp.broadcast_to((next_position + step - 1)[None, :, None], (3, batch, 1))
        hidden, cache = text.forward_cached(model.embed(token[:, None]), pos, cache, slot)
        key, sub = jax.random.split(key)
        new = _next_token(model.logits(hidden[:, 0]), sub, temperature, top_p, greedy, seen, penalty)
        new = jnp.where(done, pad_token_id, new)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, step))
        return step + 1, new, tokens, cache, done | jnp.isin(new, eos), key, seen

    carry = (jnp.asarray(1, jnp.int32), token, tokens, cache, done, key, seen)
    return jax.lax.while_loop(cond, body, carry)[2]


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 128,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int = 0,
    pixel_values=None,
    image_grid_thw=None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    repetition_penalty: float = 1.0,
) -> np.ndarray:
    """New tokens (B, max_new_tokens) int32 after each prompt; ``pad_token_id`` after a row's eos.

    model: a ``Qwen2_5_VL``. input_ids / attention_mask (B, L), left or right padded. Images in the
    Hugging Face processor layout, their image-pad tokens inside input_ids. temperature 0 = greedy;
    otherwise sampling at that temperature with nucleus ``top_p``, reproducible for a given ``seed``.
    ``repetition_penalty``: transformers' (see the module docstring); 1.0 = off (the loop then carries
    no (B, vocab) bookkeeping).
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
    # Host-side id checks before any device work (the loop embeds the prompt, its padding and, after a
    # row's eos, pad_token_id; an id beyond the embedding reads NaN: models.qwen2_5_vl.TokenIdError).
    model.check_ids(pad_token_id, "decode.generate pad_token_id")
    model.check_ids(input_ids, "decode.generate input_ids")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    real = input_ids.shape[1] if attention_mask is None else int(np.asarray(attention_mask).sum(1).max())
    ids, mask = left_align(input_ids, attention_mask, bucket_length(real, buckets), pad_token_id)
    embeds, mask, positions, deltas = model.multimodal_inputs(ids, mask, pixel_values, image_grid_thw)
    next_position = jnp.asarray(mask.sum(1) + np.asarray(deltas)[:, 0], jnp.int32)
    graphdef, state = nnx.split(model)
    tokens = _generate(
        graphdef, state, embeds, jnp.asarray(mask), jnp.asarray(positions, jnp.int32), next_position,
        jax.random.key(seed), jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.asarray(ids, jnp.int32),
        jnp.float32(repetition_penalty),
        max_new_tokens=int(max_new_tokens), eos_token_ids=tuple(int(e) for e in eos_token_ids),
        pad_token_id=int(pad_token_id), greedy=temperature == 0, penalize=repetition_penalty != 1.0,
    )
    return np.asarray(tokens)
