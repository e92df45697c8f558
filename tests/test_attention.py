"""models.attention.dot_product_attention against an explicit reference: k/v heads repeated
(transformers' repeat_kv), a dense boolean mask built here, float32 einsum + softmax. float32
throughout (the reference in float64); rtol 1e-6 with atol 1e-6 x max|output| (measured: largest
difference over all comparisons 2.6e-7 x max|output|, float32 rounding)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip3o_jax.models.attention import dot_product_attention

RTOL = 1e-6


def reference(q, k, v, mask=None, scale=None):
    """mask (B, Lq, Lk) bool or None; rows without a visible key give zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, lq, hq, d = q.shape
    rep = hq // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)  # head h reads kv head h // rep
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * (d**-0.5 if scale is None else scale)
    if mask is None:
        mask = np.ones((b, lq, k.shape[1]), bool)
    logits = np.where(mask[:, None], logits, -np.inf)
    has_key = mask.any(-1)[:, None, :, None]
    logits = np.where(has_key, logits, 0.0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = np.where(has_key, probs / probs.sum(-1, keepdims=True), 0.0)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def qkv(b=2, lq=7, lk=7, hq=4, hkv=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, lq, hq, d)).astype(np.float32),
            rng.standard_normal((b, lk, hkv, d)).astype(np.float32),
            rng.standard_normal((b, lk, hkv, d)).astype(np.float32))


def test_unmasked_and_scale():
    q, k, v = qkv(lq=5, lk=9)
    close(dot_product_attention(q, k, v), reference(q, k, v))
    close(dot_product_attention(q, k, v, scale=0.3), reference(q, k, v, scale=0.3))
    assert dot_product_attention(q, k, v).shape == (2, 5, 4, 8)


@pytest.mark.parametrize("hkv", [1, 2])
def test_grouped_kv_heads(hkv):
    q, k, v = qkv(hq=4, hkv=hkv)
    close(dot_product_attention(q, k, v), reference(q, k, v))
    # Query heads 0 and 1 share kv head 0 when hkv = 2: equal queries give equal outputs.
    q[:, :, 1] = q[:, :, 0]
    out = np.asarray(dot_product_attention(q, k, v))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])


def test_causal_with_left_padding_zeroes_padding_rows():
    q, k, v = qkv(hq=4, hkv=2)
    valid = np.ones((2, 7), bool)
    valid[1, :3] = False  # left padding
    mask = np.tril(np.ones((7, 7), bool))[None] & valid[:, None, :]
    got = np.asarray(dot_product_attention(q, k, v, causal=True, kv_segment_ids=np.where(valid, 0, -1)))
    close(got, reference(q, k, v, mask))
    np.testing.assert_array_equal(got[1, :3], 0.0)  # rows with no visible key
    # Valid rows are what the replaced Qwen attention gave (finfo.min logits, uniform padding rows).
    logits = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, 2, axis=2)) * 8**-0.5
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    old = np.einsum("bhqk,bkhd->bqhd", np.asarray(jax.nn.softmax(logits, axis=-1)), np.repeat(v, 2, axis=2))
    close(got[0], old[0])
    close(got[1, 3:], old[1, 3:])


def test_decode_step_against_cache_with_unwritten_slots():
    """One new token at cache slot 5 of 9: slots 0-1 are left padding, 6-8 not written yet."""
    q, k, v = qkv(lq=1, lk=9, hq=4, hkv=2)
    valid = np.zeros((2, 9), bool)
    valid[:, 2:6] = True
    valid[0, 1] = True  # row 0 has one more real prompt token
    got = dot_product_attention(q, k, v, causal=True, q_positions=np.array([5]), kv_positions=np.arange(9),
                                kv_segment_ids=np.where(valid, 0, -1))
    close(got, reference(q, k, v, valid[:, None, :] & (np.arange(9) <= 5)[None, None]))
    # Garbage in unwritten slots must not leak in.
    k2, v2 = k.copy(), v.copy()
    k2[:, 6:], v2[:, 6:] = 1e4, np.nan
    got2 = dot_product_attention(q, k2, np.nan_to_num(v2, nan=7.0), causal=True, q_positions=np.array([5]),
                                 kv_positions=np.arange(9), kv_segment_ids=np.where(valid, 0, -1))
    np.testing.assert_allclose(np.asarray(got2), np.asarray(got), rtol=1e-6, atol=1e-7)


def test_per_row_positions():
    q, k, v = qkv(lq=2, lk=6)
    qpos = np.array([[3, 4], [1, 5]])
    mask = np.arange(6)[None, None, :] <= qpos[:, :, None]
    close(dot_product_attention(q, k, v, causal=True, q_positions=qpos, kv_positions=np.arange(6)),
          reference(q, k, v, mask))


def test_windows_of_unequal_size_via_segment_ids():
    q, k, v = qkv(b=1, lq=10, lk=10, hq=2, hkv=2)
    seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 0]])  # non-contiguous too: token 9 joins window 0
    mask = seg[:, :, None] == seg[:, None, :]
    close(dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg), reference(q, k, v, mask))


def test_negative_segments_are_padding_on_both_sides():
    q, k, v = qkv(b=1, lq=6, lk=6)
    seg = np.array([[0, 0, 1, 1, -1, -1]])
    got = np.asarray(dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg))
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] >= 0)
    close(got, reference(q, k, v, mask))
    np.testing.assert_array_equal(got[0, 4:], 0.0)


def test_bfloat16_output_dtype_and_errors():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv())
    assert dot_product_attention(q, k, v).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="do not divide"):
        dot_product_attention(*qkv(hq=4, hkv=3))
    with pytest.raises(ValueError, match="causal=True"):
        dot_product_attention(*qkv(), q_positions=np.arange(7))

