"""Qwen2.5-VL vision tower (ViT + 2x2 patch merger) and the M-RoPE position ids of mixed image/text
sequences (reference sections 3.2, 3.3a, 4.1, 10.1).

Ports transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` and ``Qwen2_5_VLModel.get_rope_index``
(images only). Input is the image processor's layout (blip3o_jax/qwen_image_processor.py):
``pixel_values (P, C*T*p*p)`` = one row per 14x14 patch (with its 2 temporal copies), rows ordered
image by image, frame by frame, and inside a frame in 2x2 merge blocks; ``grid_thw (n_images, 3)`` =
(t, h, w) patches per image. Output: ``(P / 4, out_hidden_size)``, one row per merged 2x2 block in
the same order, ready to be written at the ``<|image_pad|>`` positions.

Attention layout. transformers reorders the tokens so every 112x112-pixel window is contiguous and
runs its variable-length kernels over ``cu_window_seqlens`` (window blocks) or ``cu_seqlens``
(full-attention blocks: one segment per image frame), then undoes the order after the merger. Here
every token carries two segment ids computed on the host from the static ``grid_thw``: its window and
its image frame, passed to ``dot_product_attention`` (a token sees the tokens of its own segment);
no (N, N) mask exists anywhere. Attention restricted to segments is permutation-equivariant, and every
other op is per token (RoPE uses each token's own (h, w) position) or per 2x2 merge block (which the
window reordering moves as a unit), so the order is a cost choice, not a numerical one:
  * ``xla`` (and whenever the backend resolves to it): processor order, the segment ids of the layer
    picked by the scan's layer counter; dense O(N^2) scores per layer, fine for BLIP3-o's 448x448
    images (N = 1024 patches, attention ~12% of a block's FLOPs);
  * ``splash``: tokens reordered window-contiguous once after the patch embedding (transformers'
    window index: a stable sort by window id), the window and frame segment ids handed over as host
    arrays, so the kernel's static block mask skips every block outside a window (the released
    max_pixels allows N = 16384: 1/128 of the blocks); each layer's two kernels sit in a ``lax.cond``
    on the layer counter; the order is undone on the merged tokens, as transformers does.

Images that share one grid (every training batch: prepare_batch fixes one grid per run) run as a
batch (B, N, D), so attention is per image; only mixed grids run as one sequence of all their patches,
the images told apart by frame segment ids (as transformers' cu_seqlens do).

Layers are stacked and scanned; a layer counter in the scan carry picks the window or the frame
segment ids per layer (``fullatt_block_indexes``), so one compiled block serves both kinds.

Parameters mirror the PyTorch names (the mapping, torch keys relative to ``visual.``, is
qwen_vision_mapping.py). The patch embedding is a Conv3d whose kernel equals its stride, i.e. a matmul over one
flattened patch; it is kept as an ``nnx.Conv`` kernel in (t, h, w, I, O) layout so weights.py's
"conv3d" transform maps the torch weight (O, I, t, h, w).
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


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """transformers Qwen2.5-VL vision_config field names; defaults = the released 7B/3B tower."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    rms_norm_eps: float = 1e-6
    attention: str = ""  # backend (models/attention.py); "" = model.attention



# Base of the axial vision RoPE: fixed by the architecture, absent from the released config.json
# (transformers' Qwen2_5_VLVisionConfig default).
VISION_ROPE_THETA = 10000.0


# ---------------------------------------------------------------------------------------------
# Host-side layout from the static grid_thw (numpy, runs at trace time)


def static_grid(grid_thw) -> np.ndarray:
    """grid_thw as an (n, 3) int64 numpy array; refuses traced values (they would fix nothing)."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError(
            "grid_thw must be a host value (numpy array or nested tuple): it fixes the attention layout "
            "at trace time. Close over it or pass it as a static argument of jit."
        )
    return np.asarray(jax.device_get(grid_thw), dtype=np.int64).reshape(-1, 3)


def vision_layout(grid_thw: np.ndarray, cfg: QwenVisionConfig) -> dict[str, np.ndarray]:
    """Per-token (processor order) rotary positions and attention segment ids.

    Returns ``pos_hw (N, 2)`` patch row/column inside its frame, ``frame_seg (N,)`` one id per image
    frame (full-attention blocks) and ``window_seg (N,)`` one id per window of
    ``window_size // patch_size`` patches per side (window blocks), equal to transformers'
    get_vision_position_ids / cu_seqlens / get_vision_window_index up to the token order.
    """
    m = cfg.spatial_merge_size
    win = cfg.window_size // m // cfg.patch_size  # window side in merged tokens
    pos, frame_seg, window_seg = [], [], []
    frames = windows = 0
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size={m}")
        # Processor order inside a frame: (block row, block col, row in block, col in block).
        bh, bw, ih, iw = np.meshgrid(np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij")
        rows, cols = (bh * m + ih).reshape(-1), (bw * m + iw).reshape(-1)
        n_win_w = -(-(w // m) // win)
        win_id = ((bh // win) * n_win_w + bw // win).reshape(-1)
        n_win = -(-(h // m) // win) * n_win_w
        for _ in range(t):
            pos.append(np.stack([rows, cols], -1))
            frame_seg.append(np.full(h * w, frames))
            window_seg.append(win_id + windows)
            frames += 1
            windows += n_win
    return {
        "pos_hw": np.concatenate(pos).astype(np.int32),
        "frame_seg": np.concatenate(frame_seg).astype(np.int32),
        "window_seg": np.concatenate(window_seg).astype(np.int32),
    }


# ---------------------------------------------------------------------------------------------
# Modules


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (2, 14, 14) over each flattened processor patch, no bias."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nnx.Conv(
            cfg.in_channels,
            cfg.hidden_size,
            kernel_size=k,
            strides=k,
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.with_partitioning(nn.torch_linear_init, (None, None, None, "conv_in", "embed")),
            rngs=rngs,
        )

    def __call__(self, pixel_values):
        c = self.cfg
        # Processor rows are (C, T, p, p) flattened; nnx.Conv wants channels last.
        x = pixel_values.reshape(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        x = x.transpose(0, 2, 3, 4, 1)
        return self.proj(x).reshape(-1, c.hidden_size)


def rotary_cos_sin(pos_hw: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """Axial 2-D RoPE tables (N, head_dim) in float32: [h freqs, w freqs] repeated twice (rotate_half)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (VISION_ROPE_THETA ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # (N, 2, head_dim // 4)
    freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rotary(x, cos, sin):
    """x (..., N, heads, head_dim) rotated in float32 with the rotate_half convention; cos, sin (N, head_dim)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nn.linear(d, 3 * d, ("embed", "heads"), **kw)  # fused [q; k; v] as in torch
        self.proj = nn.linear(d, d, ("heads", "embed"), **kw)

    def __call__(self, x, cos, sin, attend):
        """x (B, N, D); ``attend(q, k, v)`` on (B, N, heads, head_dim): a token attends to the tokens of
        its segment (its window or its frame; QwenVisionTower builds it per layer)."""
        qkv = self.qkv(x).reshape(*x.shape[:2], 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attend(q, k, v)
        return self.proj(out.reshape(*x.shape[:2], self.num_heads * self.head_dim))


class VisionMLP(nnx.Module):
    """Biased SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nn.linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = nn.linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = nn.linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.norm2 = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, **kw)
        self.mlp = VisionMLP(cfg, rngs=rngs, **kw)

    def __call__(self, x, cos, sin, attend):
        x = x + self.attn(self.norm1(x), cos, sin, attend)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """ln_q RMSNorm, then each 2x2 block of consecutive tokens concatenated -> Linear, GELU, Linear."""

    def __init__(self, cfg: QwenVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        # Indices 0 and 2 as in torch's nn.Sequential(Linear, GELU, Linear).
        self.mlp = nnx.Sequential(
            nn.linear(self.width, self.width, ("embed", "mlp"), **kw),
            functools.partial(jax.nn.gelu, approximate=False),
            nn.linear(self.width, cfg.out_hidden_size, ("mlp", "embed"), **kw),
        )

    def __call__(self, x):
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


class QwenVisionTower(nnx.Module):
    """``tower(pixel_values (P, C*T*p*p), grid_thw (n, 3) host ints) -> (P / merge**2, out_hidden_size)``."""

    def __init__(
        self,
        cfg: QwenVisionConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"vision hidden_size {cfg.hidden_size} not divisible by num_heads {cfg.num_heads}")
        nn.remat_policy(remat)  # validate the name early
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        self.attention = attention.check_implementation(cfg.attention, "model.vision.attention")
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, **kw)
        self.blocks = nn.stack_layers(lambda r: VisionBlock(cfg, rngs=r, **kw), cfg.depth, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs, **kw)
        # 1 = full attention over the image frame, 0 = window attention; indexed by the scan's layer counter.
        self.full_attention = tuple(int(i in cfg.fullatt_block_indexes) for i in range(cfg.depth))

    def __call__(self, pixel_values: jax.Array, grid_thw) -> jax.Array:
        cfg = self.cfg
        grid = static_grid(grid_thw)
        # Images of one grid (the trainer's batches, prepare_batch) run as a batch: attention per image,
        # (B, N, N) scores sharded with the batch, where one sequence of all B * N patches would compute
        # (and, sharded, gather) B times the pairs, all but 1 / B of them masked. Mixed grids run as one
        # sequence told apart by frame segment ids, as transformers' cu_seqlens do.
        batch = len(grid) if len(grid) > 1 and (grid == grid[0]).all() else 1
        layout = vision_layout(grid[:1] if batch > 1 else grid, cfg)
        n = layout["pos_hw"].shape[0]
        if pixel_values.shape[0] != batch * n:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw {grid.tolist()} "
                             f"gives {batch * n}")

        x = self.patch_embed(pixel_values.astype(self.dtype)).reshape(batch, n, cfg.hidden_size)
        head_dim = cfg.hidden_size // cfg.num_heads
        full_attention = jnp.asarray(self.full_attention, jnp.int32)
        backend = attention.select_backend(self.attention, q_shape=(batch, n, cfg.num_heads, head_dim),
                                           kv_shape=(batch, n, cfg.num_heads, head_dim), dtype=x.dtype,
                                           static_segments=True)
        if backend == "splash":
            return self._window_contiguous(x, layout, full_attention)

        cos, sin = rotary_cos_sin(jnp.asarray(layout["pos_hw"]), head_dim)
        segments = jnp.asarray(np.stack([layout["window_seg"], layout["frame_seg"]]))  # row = full flag

        def block_call(block, carry, segments, full_attention, cos, sin):
            h, layer = carry
            seg = segments[full_attention[layer]]  # (N,): shared by the batch
            attend = functools.partial(dot_product_attention, q_segment_ids=seg, kv_segment_ids=seg,
                                       implementation="xla")
            return block(h, cos, sin, attend), layer + 1

        x, _ = nn.scan_layers(
            self.blocks,
            (x, jnp.zeros((), jnp.int32)),
            segments,
            full_attention,
            cos,
            sin,
            remat=self.remat,
            block_call=block_call,
        )
        return self.merger(x)

    def _window_contiguous(self, x, layout, full_attention):
        """The blocks on window-contiguous tokens with host segment ids (splash's static block mask)."""
        cfg = self.cfg
        # transformers' window index: windows in id order (frame by frame), processor order inside a
        # window. A stable sort keeps each 2x2 merge unit (4 consecutive patches, one window) together.
        order = np.argsort(layout["window_seg"], kind="stable")
        window_seg, frame_seg = layout["window_seg"][order], layout["frame_seg"][order]
        cos, sin = rotary_cos_sin(jnp.asarray(layout["pos_hw"][order]), cfg.hidden_size // cfg.num_heads)
        window, frame = (functools.partial(dot_product_attention, q_segment_ids=s, kv_segment_ids=s,
                                           implementation="splash") for s in (window_seg, frame_seg))

        def block_call(block, carry, full_attention, cos, sin):
            h, layer = carry
            attend = lambda q, k, v: jax.lax.cond(full_attention[layer] > 0, frame, window, q, k, v)
            return block(h, cos, sin, attend), layer + 1

        x, _ = nn.scan_layers(self.blocks, (x[:, order], jnp.zeros((), jnp.int32)), full_attention, cos, sin,
                              remat=self.remat, block_call=block_call)
        merged = self.merger(x)
        unit = cfg.spatial_merge_size**2
        merged = merged.reshape(x.shape[0], -1, merged.shape[-1])[:, np.argsort(order[::unit] // unit)]
        return merged.reshape(-1, merged.shape[-1])  # back to processor order


# ---------------------------------------------------------------------------------------------
# M-RoPE position ids of a mixed image/text sequence


def get_rope_index(
    input_ids,
    image_grid_thw=None,
    attention_mask=None,
    *,
    spatial_merge_size: int,
    image_token_id: int,
    vision_start_token_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3-D (temporal, height, width) positions for the LLM, as transformers 5.23
    ``Qwen2_5_VLModel.get_rope_index`` for images (host numpy).

    Text tokens count up by one on all three axes; an image of merged grid (t, h, w) at running
    position s gets (s + t_idx, s + h_idx, s + w_idx) over its t*h*w ``image_token_id`` tokens, and
    the next token continues at s + max(h, w). Images are taken from ``image_grid_thw`` in order,
    across the batch rows. Padding (``attention_mask == 0``, left or right) gets position 0 and is
    skipped by the count. If ``vision_start_token_id`` is given, every image must directly follow it.

    Returns ``position_ids (3, B, L)`` int32 and ``rope_deltas (B, 1)`` int32
    (= max position + 1 - number of real tokens; generation continues at ``cache length + delta``).
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.asarray(image_grid_thw, np.int64).reshape(-1, 3) if image_grid_thw is not None else ())
    m = spatial_merge_size
    position_ids = np.zeros((3, batch, length), np.int32)
    deltas = np.zeros((batch, 1), np.int32)
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        chunks, start, i = [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                j = i + 1
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                chunks.append(np.broadcast_to(np.arange(j - i) + start, (3, j - i)))
                start += j - i
                i = j
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"row {b}: more images in input_ids than rows in image_grid_thw")
            if vision_start_token_id is not None and (i == 0 or ids[i - 1] != vision_start_token_id):
                raise ValueError(f"row {b}: image tokens at {i} do not follow vision_start_token_id")
            gt, gh, gw = int(grid[0]), int(grid[1]) // m, int(grid[2]) // m
            count = gt * gh * gw
            if len(ids[i : i + count]) != count or not np.all(ids[i : i + count] == image_token_id):
                raise ValueError(f"row {b}: image at {i} needs {count} consecutive image tokens for grid {grid.tolist()}")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + start)
            start += max(gh, gw)
            i += count
        if not chunks:  # fully padded row
            continue
        positions = np.concatenate(chunks, axis=1)
        position_ids[:, b, mask[b]] = positions
        deltas[b, 0] = positions.max() + 1 - len(ids)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than there are images in input_ids")
    return position_ids, deltas
