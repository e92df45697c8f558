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

Backends (``implementation``; config ``model.attention``, per component ``model.<component>.attention``):
  * ``xla``: the einsum path below, float32 (B, heads, Lq, Lk) scores. Exact reference numerics; the
    only backend for decode steps (per-row query positions) and the fallback for every call a kernel
    cannot take.
  * ``splash``: TPU Pallas splash attention (flash-style, no scores in HBM). Runs inside ``shard_map``
    (Mosaic kernels cannot be partitioned automatically): batch over the mesh's data/fsdp axes, heads
    over tensor, when they divide. Sequences are padded to multiples of 128 (padded keys invisible,
    padded query rows dropped). Causal masks need the default positions (token indices); traced
    segment ids mask inside blocks; segment ids given as host numpy arrays (L,) become the kernel's
    static block mask, so blocks no query can see are skipped (the Qwen ViT's windows, reordered
    window-contiguous by the caller). Off TPU it runs in Pallas interpret mode (tests; slow).
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, bfloat16/float16 on NVIDIA
    GPUs. cuDNN takes ``is_causal`` but no segment ids, and its sequence lengths assume right padding
    while our prompts are left-padded: calls with segment ids or explicit positions go to ``xla``.
  * ``auto``: the mesh's device platform decides (``jax.default_backend()`` without a mesh: during a
    TPU AOT compile the default backend is still "cpu"): splash on TPU, cuDNN on GPU, each only for
    calls it takes and with ``Lk >= AUTO_MIN_KV_LENGTH`` and ``Lq >= AUTO_MIN_Q_LENGTH`` (decode steps,
    the DiT's 64 tokens and short caption cross-attention stay on xla); xla elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
# What "" (a component's config left unset) and a module built straight from its dataclass mean.
DEFAULT_IMPLEMENTATION = "auto"
# auto's crossover. Not measured (no TPU/GPU here): below ~512 keys the (Lq, Lk) float32 scores are
# small (1 MiB per head at 512x512) and splash's padding to 128-multiples wastes up to 2x per axis
# (the DiT's 64 tokens would compute 128x128), so xla is kept. benchmarks/attention_gpu.py times it.
AUTO_MIN_KV_LENGTH = 512
AUTO_MIN_Q_LENGTH = 128
SPLASH_BLOCK = 128  # the kernel's lane width: every block size is a multiple of it
BATCH_AXES = ("data", "fsdp")  # mesh axes of the batch (sharding._BATCH), tried in this order
HEAD_AXES = ("tensor",)  # mesh axis of the heads (sharding rule tables: act_heads -> tensor)


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


# ---------------------------------------------------------------------------------------------
# Backend choice


def check_implementation(name: str, key: str = "implementation") -> str:
    """``name`` if it is a backend ("" = the default); a ValueError naming ``key`` otherwise."""
    if name not in ("", *IMPLEMENTATIONS):
        raise ValueError(f"{key}={name!r} is not an attention implementation; allowed: {list(IMPLEMENTATIONS)}")
    return name or DEFAULT_IMPLEMENTATION


def platform() -> str:
    """The platform the current computation is compiled for: the context mesh's devices if there is a
    mesh (a TPU AOT compile on a topology mesh traces on a "cpu" default backend), else the default."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _is_static(*segment_ids) -> bool:
    """Host segment ids (numpy, one (L,) row for the whole batch) fix splash's static block mask."""
    given = [s for s in segment_ids if s is not None]
    return bool(given) and all(isinstance(s, np.ndarray) and s.ndim == 1 for s in given)


def select_backend(implementation: str, *, q_shape, kv_shape, dtype, causal: bool = False,
                   positions: bool = False, segment_ids: bool = False, static_segments: bool = False,
                   on: str | None = None) -> str:
    """The backend ("xla" | "splash" | "cudnn") that runs one call with these properties.

    ``positions``: explicit q/kv positions were given (the decode step); ``segment_ids``: traced segment
    ids; ``static_segments``: host segment ids (splash's block mask); ``on``: the platform (default:
    ``platform()``). Explicit ``splash`` / ``cudnn`` run every call their kernel takes and leave the rest to
    xla; ``auto`` adds the platform and the length crossover.
    """
    implementation = check_implementation(implementation)
    if implementation == "xla":
        return "xla"
    lq, lk, d = q_shape[1], kv_shape[1], q_shape[3]
    # Splash's causal mask is on token indices; per-row query positions (a KV-cache step) are not.
    splash_ok = not (causal and positions)
    cudnn_ok = (not positions and not segment_ids and not static_segments and d % 8 == 0 and d <= 128
                and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))
    on = on or platform()
    if implementation == "splash":
        return "splash" if splash_ok else "xla"
    if implementation == "cudnn":
        if on != "gpu":
            raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU, the platform is {on!r} "
                             "(set model.attention / model.<component>.attention to auto or xla)")
        return "cudnn" if cudnn_ok else "xla"
    long_enough = lk >= AUTO_MIN_KV_LENGTH and lq >= AUTO_MIN_Q_LENGTH
    if on == "tpu" and splash_ok and long_enough:
        return "splash"
    if on == "gpu" and cudnn_ok and long_enough:
        return "cudnn"
    return "xla"


# ---------------------------------------------------------------------------------------------
# Splash (TPU Pallas)


class SegmentMask(splash.Mask):
    """Splash's static (Lq, Lk) mask, evaluated one block at a time from host segment ids (no (Lq, Lk)
    array): key j visible to query i iff ``q_ids[i] == kv_ids[j]`` (callers give padding different
    negative ids on the two sides) and, if causal, ``j <= i``. Blocks where it is all False are skipped."""

    def __init__(self, q_ids: np.ndarray, kv_ids: np.ndarray, causal: bool):
        self.q_ids, self.kv_ids, self.causal = q_ids, kv_ids, causal
        self._hash = hash((causal, q_ids.tobytes(), kv_ids.tobytes()))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.q_ids), len(self.kv_ids))

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = idx
        visible = self.q_ids[rows][:, None] == self.kv_ids[cols][None, :]
        if self.causal:
            r, c = np.arange(len(self.q_ids))[rows], np.arange(len(self.kv_ids))[cols]
            visible &= r[:, None] >= c[None, :]
        return visible

    def __eq__(self, other):
        return (isinstance(other, SegmentMask) and self.causal == other.causal
                and np.array_equal(self.q_ids, other.q_ids) and np.array_equal(self.kv_ids, other.kv_ids))

    def __hash__(self):
        return self._hash


def _pad_ids(ids, length: int, pad: int, xp):
    """Segment ids with our "negative = padding" mapped to ``pad`` and padded to ``length``. Query
    padding gets -2 and key padding -1, so the kernel's plain equality never matches them."""
    ids = xp.where(ids < 0, pad, ids).astype(np.int32)
    widths = [(0, 0)] * (ids.ndim - 1) + [(0, length - ids.shape[-1])]
    return xp.pad(ids, widths, constant_values=pad)


def _rows_with_key(q_ids, kv_ids, causal: bool, xp):
    """(Lq,) bool: query i has a visible key, in O(L log L): sort the keys by (id, index) and look up each
    query's id; the first match is the segment's earliest key (for causal, it must not be after i).
    Ids as after ``_pad_ids`` (negative = padding, never equal across the two sides)."""
    lk = kv_ids.shape[0]
    index = xp.arange(lk, dtype=np.int32)
    order = xp.lexsort((index, kv_ids))
    ids, first = kv_ids[order], index[order]
    at = xp.clip(xp.searchsorted(ids, q_ids), 0, lk - 1)
    found = (ids[at] == q_ids) & (q_ids >= 0)
    if causal:
        found &= first[at] <= xp.arange(q_ids.shape[0])
    return found


def _block(length: int, static: bool) -> int:
    # Host block masks (windows of 64 ViT tokens) waste least at the smallest block; otherwise the
    # largest of MaxText's sizes that divides the padded length.
    if static:
        return SPLASH_BLOCK
    return next(b for b in (512, 256, 128) if length % b == 0)


def _mesh_axes(mesh, names, size: int) -> tuple[str, ...]:
    """The mesh axes among ``names`` (in order) whose product divides ``size``."""
    axes, product = [], 1
    for name in names:
        if name in mesh.axis_names and mesh.shape[name] > 1 and size % (product * mesh.shape[name]) == 0:
            axes.append(name)
            product *= mesh.shape[name]
    return tuple(axes)


def _splash_attention(q, k, v, *, causal, q_segment_ids, kv_segment_ids, scale):
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    lq_pad, lk_pad = -(-lq // SPLASH_BLOCK) * SPLASH_BLOCK, -(-lk // SPLASH_BLOCK) * SPLASH_BLOCK
    static = _is_static(q_segment_ids, kv_segment_ids)
    has_key = None  # (B, Lq) or (Lq,) where some query may see no key; None: every query sees one
    dynamic = None
    if static:
        qs = np.zeros(lq, np.int32) if q_segment_ids is None else q_segment_ids
        ks = np.zeros(lk, np.int32) if kv_segment_ids is None else kv_segment_ids
        qs, ks = _pad_ids(qs, lq_pad, -2, np), _pad_ids(ks, lk_pad, -1, np)
        rows = _rows_with_key(qs, ks, causal, np)[:lq]
        has_key = None if rows.all() else rows[None]
        mask = SegmentMask(qs, ks, causal)
    else:
        # Static part: padding only (its blocks are skipped); traced ids mask inside the blocks.
        pad_q = _pad_ids(np.zeros(lq, np.int32), lq_pad, -2, np)
        pad_kv = _pad_ids(np.zeros(lk, np.int32), lk_pad, -1, np)
        if lq_pad == lq and lk_pad == lk:
            mask = splash.CausalMask((lq, lk)) if causal else splash.FullMask((lq, lk))
        else:
            mask = SegmentMask(pad_q, pad_kv, causal)
        if q_segment_ids is not None or kv_segment_ids is not None:
            qs = jnp.zeros((b, lq), jnp.int32) if q_segment_ids is None else jnp.broadcast_to(q_segment_ids, (b, lq))
            ks = jnp.zeros((b, lk), jnp.int32) if kv_segment_ids is None else jnp.broadcast_to(kv_segment_ids, (b, lk))
            dynamic = (_pad_ids(qs, lq_pad, -2, jnp), _pad_ids(ks, lk_pad, -1, jnp))
            has_key = jax.vmap(lambda a, c: _rows_with_key(a, c, causal, jnp))(*dynamic)[:, :lq]

    sizes = dict(block_q=_block(lq_pad, static), block_kv=_block(lk_pad, static))
    sizes.update(block_kv_compute=sizes["block_kv"], block_q_dkv=sizes["block_q"], block_kv_dkv=sizes["block_kv"],
                 block_kv_dkv_compute=sizes["block_kv"], block_q_dq=sizes["block_q"], block_kv_dq=sizes["block_kv"])
    interpret = platform() != "tpu"

    # The kernel takes one example, heads first: (H, L, D). The scale goes into q (splash has none).
    to_kernel = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    qk = to_kernel((q.astype(jnp.float32) * scale).astype(q.dtype), lq_pad)
    kk, vk = to_kernel(k, lk_pad), to_kernel(v, lk_pad)

    def body(q, k, v, *segments):
        # Built on the local (per-shard) head count: shard_map hands every device whole heads.
        kernel = splash.make_splash_mha(splash.MultiHeadMask([mask] * q.shape[1]),
                                        block_sizes=splash.BlockSizes(**sizes), head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
        if segments:
            return jax.vmap(lambda q, k, v, s, t: kernel(q, k, v, segment_ids=splash.SegmentIds(s, t)))(q, k, v, *segments)
        return jax.vmap(kernel)(q, k, v)

    args = (qk, kk, vk) + (dynamic or ())
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch = _mesh_axes(mesh, BATCH_AXES, b) or None
        heads = _mesh_axes(mesh, HEAD_AXES, k.shape[2]) or None
        heads_spec, ids_spec = P(batch, heads, None, None), P(batch, None)
        body = jax.shard_map(body, mesh=mesh, in_specs=(heads_spec,) * 3 + (ids_spec,) * len(args[3:]),
                             out_specs=heads_spec, check_vma=False)
    out = body(*args).transpose(0, 2, 1, 3)[:, :lq].astype(v.dtype)
    if has_key is not None:
        out = jnp.where(jnp.asarray(has_key)[:, :, None, None], out, 0)
    return out


def _cudnn_attention(q, k, v, *, causal, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn").astype(v.dtype)


# ---------------------------------------------------------------------------------------------
# The function


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
    implementation: str = "xla",
) -> jax.Array:
    """Softmax attention (B, Lq, Hq, D) of q over k/v; the masking conventions are in the module docstring.

    Positions and segment ids are (B, L) ints or (L,) shared by the batch; segment ids as numpy (L,)
    arrays are static (splash skips the blocks they hide). ``implementation``: a backend of
    ``IMPLEMENTATIONS`` ("" = auto), resolved per call by ``select_backend``.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"need q (B, Lq, Hq, D) and k, v (B, Lk, Hkv, D); got {q.shape}, {k.shape}, {v.shape}")
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hkv} key/value heads do not divide {hq} query heads")
    if not causal and (q_positions is not None or kv_positions is not None):
        raise ValueError("q_positions / kv_positions only take effect with causal=True")
    scale = d**-0.5 if scale is None else scale
    static = _is_static(q_segment_ids, kv_segment_ids)
    backend = select_backend(implementation, q_shape=q.shape, kv_shape=k.shape, dtype=q.dtype, causal=causal,
                             positions=q_positions is not None or kv_positions is not None,
                             segment_ids=not static and (q_segment_ids is not None or kv_segment_ids is not None),
                             static_segments=static)
    if backend == "splash":
        return _splash_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                                 kv_segment_ids=kv_segment_ids, scale=scale)
    if backend == "cudnn":
        return _cudnn_attention(q, k, v, causal=causal, scale=scale)
    mask = _visible(b, lq, lk, causal=causal, q_positions=q_positions, kv_positions=kv_positions,
                    q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    return _xla_attention(q, k, v, mask, scale)
