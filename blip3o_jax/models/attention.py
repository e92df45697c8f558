"""The one attention function every model calls (DiT, UNet/VAE, Qwen text + KV cache, Qwen ViT, EVA, SigLIP2).

Why this signature. Fused attention kernels do not take a dense (Lq, Lk) mask: cuDNN (through
``jax.nn.dot_product_attention``) takes ``is_causal`` and per-row sequence lengths, TPU Pallas splash
attention takes a causal mask object and ``SegmentIds(q, kv)``. Both want (B, L, heads, head_dim)
inputs with grouped k/v heads. So callers describe *which* keys a query may see (positions and
segment ids, O(L) integers) and never build an (L, L) array; how the mask is realised is this
module's business, and a kernel can replace the einsum path below without changing any caller.

Conventions.
  * q (B, Lq, Hq, D); k, v (B, Lk, Hkv, D) with Hkv dividing Hq. Query head h reads k/v head
    h // (Hq / Hkv): each k/v head serves a consecutive group of query heads (transformers'
    ``repeat_kv`` and diffusers' order).
  * ``causal``: key j is visible to query i iff ``kv_positions[j] <= q_positions[i]``. Positions are
    token indices (cache slots), not RoPE positions (M-RoPE positions repeat across an image).
    Defaults: ``arange(Lq)`` / ``arange(Lk)``. A KV-cache step passes the query's slot and
    ``arange(cache_length)``.
  * Segment ids (B, Lq) / (B, Lk) ints: key j is visible to query i iff their ids are equal and the
    key's id is >= 0. A negative id marks padding or an unwritten cache slot: such a key is never
    visible. Either side may be given alone: ``kv_segment_ids`` alone is a key-padding mask (every
    query segment 0), ``q_segment_ids`` alone is compared against key segment 0. Windows of
    different sizes (the Qwen ViT) are just different ids.
  * A query row with no visible key returns zeros (not a uniform average over all keys).
  * ``scale`` defaults to D**-0.5. Logits are computed in float32 (``preferred_element_type``),
    scaled, masked, softmaxed in float32; the probabilities are cast to v's dtype before the
    probability-value product, whose result is in v's dtype. This is the cast order every model
    here used before (and torch's eager attention: float32 softmax, then ``.to(v.dtype)``).

Where a fused kernel plugs in: ``dot_product_attention`` dispatches to ``_xla_attention``; a
backend-specific branch (cuDNN via ``jax.nn.dot_product_attention(..., implementation="cudnn")`` with
``is_causal`` / ``key_value_seq_lengths``, or splash attention with ``SegmentIds``) goes in front of
that call, chosen from the platform and from which arguments are set; its adapter maps negative
segment ids to the kernel's padding mechanism and zeroes rows without a visible key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _visible(b: int, lq: int, lk: int, *, causal, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    """(B, Lq, Lk) bool mask, or None when every key is visible to every query."""
    mask = None
    if causal:
        qp = jnp.arange(lq) if q_positions is None else jnp.asarray(q_positions)
        kp = jnp.arange(lk) if kv_positions is None else jnp.asarray(kv_positions)
        qp = jnp.broadcast_to(qp, (b, lq)) if qp.ndim < 2 else qp
        kp = jnp.broadcast_to(kp, (b, lk)) if kp.ndim < 2 else kp
        mask = kp[:, None, :] <= qp[:, :, None]
    if q_segment_ids is not None or kv_segment_ids is not None:
        qs = jnp.zeros((b, lq), jnp.int32) if q_segment_ids is None else jnp.broadcast_to(q_segment_ids, (b, lq))
        ks = jnp.zeros((b, lk), jnp.int32) if kv_segment_ids is None else jnp.broadcast_to(kv_segment_ids, (b, lk))
        same = (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] >= 0)
        mask = same if mask is None else mask & same
    return mask


def _xla_attention(q, k, v, mask, scale):
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    # Logits (B, Hkv, G, Lq, Lk), G = Hq / Hkv query heads per k/v head. Without grouping the G axis
    # is left out: XLA's CPU dot then rounds exactly as the per-model einsums this replaced.
    if hkv == hq:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)[:, :, None]
    else:
        q = q.reshape(b, lq, hkv, hq // hkv, d)
        logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * scale
    if mask is not None:
        # finfo.min, not -inf: a row with no visible key stays finite (zeroed below) instead of NaN.
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(jnp.any(mask, axis=-1)[:, None, None, :, None], probs, 0.0)
    probs = probs.astype(v.dtype)
    if hkv == hq:
        return jnp.einsum("bhqk,bkhd->bqhd", probs[:, :, 0], v)
    return jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(b, lq, hq, d)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Softmax attention (B, Lq, Hq, D) of q over k/v; the masking conventions are in the module docstring.

    Positions and segment ids are (B, L) ints or (L,) shared by the batch.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"need q (B, Lq, Hq, D) and k, v (B, Lk, Hkv, D); got {q.shape}, {k.shape}, {v.shape}")
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hkv} key/value heads do not divide {hq} query heads")
    if not causal and (q_positions is not None or kv_positions is not None):
        raise ValueError("q_positions / kv_positions only take effect with causal=True")
    mask = _visible(b, lq, lk, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    return _xla_attention(q, k, v, mask, d**-0.5 if scale is None else scale)
