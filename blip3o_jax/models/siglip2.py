"""SigLIP2 vision encoder as an alternative generation target (docs/model.md 8.3).

Ports transformers' ``Siglip2VisionModel`` (5.23.0) for fixed-size square images, all patches valid:
  patch embedding = Linear over flattened patches (SigLIP2's layout: (row, col, channel) inside a
  patch, patches row-major) -> + learned position table (sqrt(num_patches)^2 grid) resized
  bilinearly with antialias to the image's patch grid -> pre-norm encoder layers
  (x = x + Attn(LN1(x)); x = x + MLP(LN2(x)), tanh-GELU MLP) -> post_layernorm.

The BLIP3-o SigLIP2 target (docs/model.md 8.3, the SigLIP2 + SANA recipe) is ``hidden_states[-2]``: the
output of the penultimate layer, *before* ``post_layernorm``, adaptive-average-pooled over the token
grid to ``num_pooled_tokens`` (8x8 = 64). ``hidden_states`` counts as in transformers: index 0 is the
embedding output, index i the output of layer i. Layers after the feature layer are not run.

Parameter names mirror the PyTorch module (``embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.q_proj``, ...), so ``siglip2_mapping.py`` is a one-to-one table. The
attention-pooling ``head`` of the PyTorch model is not ported (never part of the target).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax.models import attention
from blip3o_jax.models import layers as nn
from blip3o_jax.models.attention import dot_product_attention


@dataclasses.dataclass(frozen=True)
class Siglip2Config:
    """transformers Siglip2VisionConfig field names; defaults = siglip2-so400m-patch16-512."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    num_patches: int = 1024  # learned position-embedding grid = sqrt(num_patches)^2
    image_size: int = 512
    layer_norm_eps: float = 1e-6
    feature_layer: int = -2  # hidden_states index used as features (-2 = penultimate layer output)
    num_pooled_tokens: int = 64  # adaptive average pooling of the token grid
    attention: str = ""  # backend (models/attention.py); "" = model.attention

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


def layers_for_hidden_state(index: int, num_layers: int, what: str = "hidden_states index") -> int:
    """transformers' ``hidden_states[index]`` (num_layers + 1 entries) is the output of this many layers."""
    n = index if index >= 0 else num_layers + 1 + index
    if not 0 <= n <= num_layers:
        raise ValueError(f"{what} {index} is outside hidden_states: 0..{num_layers} or -{num_layers + 1}..-1")
    return n


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C) in SigLIP2's flattened-patch layout.

    Patches row-major; inside a patch (row, col, channel), as ``convert_image_to_patches`` in
    transformers' Siglip2 image processor.
    """
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights of ``F.adaptive_avg_pool1d``: window i = [floor(i*n/m), ceil((i+1)*n/m))."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool_tokens(tokens: jax.Array, out_side: int) -> jax.Array:
    """(B, g*g, C) row-major grid -> (B, out_side^2, C) as ``F.adaptive_avg_pool2d`` on (B, C, g, g).

    Adaptive windows are rectangles, so 2-D pooling is the 1-D pooling matrix applied to rows and
    columns. Computed in float32.
    """
    b, n, c = tokens.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    m = jnp.asarray(adaptive_pool_matrix(g, out_side))
    grid = tokens.astype(jnp.float32).reshape(b, g, g, c)
    pooled = jnp.einsum("ih,jw,bhwc->bijc", m, m, grid, precision=jax.lax.Precision.HIGHEST)
    return pooled.reshape(b, out_side * out_side, c)


class Siglip2Attention(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = nn.linear(d, d, ("embed", "heads"), **kw)
        self.k_proj = nn.linear(d, d, ("embed", "heads"), **kw)
        self.v_proj = nn.linear(d, d, ("embed", "heads"), **kw)
        self.out_proj = nn.linear(d, d, ("heads", "embed"), **kw)
        self.attention = attention.check_implementation(cfg.attention, "model.siglip2.attention")

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)  # noqa: E731
        # Fixed-size images, every patch valid: no padding mask (transformers' is all ones here).
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                    implementation=self.attention)
        return self.out_proj(out.reshape(b, n, self.num_heads * self.head_dim))


class Siglip2Mlp(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = nn.linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = nn.linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))  # hidden_act gelu_pytorch_tanh


class Siglip2EncoderLayer(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, fast_variance=True,
                                          param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Siglip2Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, fast_variance=True,
                                          param_dtype=param_dtype, rngs=rngs)
        self.mlp = Siglip2Mlp(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Siglip2Embeddings(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        side = math.isqrt(cfg.num_patches)
        if side * side != cfg.num_patches:
            raise ValueError(f"Siglip2Config.num_patches={cfg.num_patches} must be a square number")
        self.patch_size, self.pos_side, self.dtype = cfg.patch_size, side, dtype
        in_features = cfg.num_channels * cfg.patch_size**2
        self.patch_embedding = nn.linear(in_features, cfg.hidden_size, ("conv_in", "embed"), rngs=rngs,
                                         dtype=dtype, param_dtype=param_dtype)
        self.position_embedding = nnx.Embed(
            cfg.num_patches,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.hidden_size**-0.5), (None, "embed")),
            rngs=rngs,
        )

    def positions(self, grid_h: int, grid_w: int) -> jax.Array:
        """The learned (side, side) table resized to the patch grid, (grid_h*grid_w, D) row-major.

        ``F.interpolate(bilinear, align_corners=False, antialias=True)`` as transformers does, in float32;
        the same grid is an exact identity and skipped.
        """
        table = self.position_embedding.embedding[...].astype(jnp.float32)
        table = table.reshape(self.pos_side, self.pos_side, -1)
        if (grid_h, grid_w) != (self.pos_side, self.pos_side):
            table = jax.image.resize(table, (grid_h, grid_w, table.shape[-1]), method="bilinear", antialias=True)
        return table.reshape(grid_h * grid_w, -1)

    def __call__(self, images: jax.Array) -> jax.Array:
        _, h, w, _ = images.shape
        p = self.patch_size
        x = self.patch_embedding(patchify(images.astype(self.dtype), p))
        return x + self.positions(h // p, w // p).astype(self.dtype)


class Siglip2Encoder(nnx.Module):
    def __init__(self, cfg: Siglip2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layers = nn.stack_layers(
            lambda r: Siglip2EncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r),
            cfg.num_hidden_layers,
            rngs,
        )


class Siglip2VisionModel(nnx.Module):
    """SigLIP2 vision tower without the attention-pooling head.

    ``hidden_state(images, index)``: transformers' ``hidden_states[index]`` (0 = embeddings).
    ``features(images)``: ``hidden_state(images, cfg.feature_layer)``, (B, g*g, D) in ``dtype``.
    ``last_hidden_state(images)``: the last layer after ``post_layernorm``.
    ``target_features(images)``: ``features`` adaptive-average-pooled to ``num_pooled_tokens``, float32.
    """

    def __init__(
        self,
        cfg: Siglip2Config,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if cfg.hidden_size % cfg.num_attention_heads or cfg.image_size % cfg.patch_size:
            raise ValueError(f"Siglip2Config: heads must divide hidden_size and patch_size image_size: {cfg}")
        layers_for_hidden_state(cfg.feature_layer, cfg.num_hidden_layers, "Siglip2Config.feature_layer")
        if math.isqrt(cfg.num_pooled_tokens) ** 2 != cfg.num_pooled_tokens:
            raise ValueError(f"Siglip2Config.num_pooled_tokens={cfg.num_pooled_tokens} must be a square number")
        nn.remat_policy(remat)  # fail early on an unknown policy name
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = Siglip2Embeddings(cfg, **kw)
        self.encoder = Siglip2Encoder(cfg, **kw)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, fast_variance=True,
                                           param_dtype=param_dtype, rngs=rngs)

    def hidden_state(self, images: jax.Array, index: int) -> jax.Array:
        n = layers_for_hidden_state(index, self.cfg.num_hidden_layers)
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, self.cfg.num_channels):
            raise ValueError(f"SigLIP2 expects images of shape (B, {s}, {s}, {self.cfg.num_channels}), "
                             f"got {images.shape}")
        x = self.embeddings(images)
        if n == 0:
            return x
        layers = self.encoder.layers
        if n < self.cfg.num_hidden_layers:  # run only the first n of the stacked layers
            graphdef, state = nnx.split(layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:n], state))
        return nn.scan_layers(layers, x, remat=self.remat)

    def features(self, images: jax.Array) -> jax.Array:
        return self.hidden_state(images, self.cfg.feature_layer)

    def last_hidden_state(self, images: jax.Array) -> jax.Array:
        x = self.hidden_state(images, -1)
        return self.post_layernorm(x)

    def target_features(self, images: jax.Array) -> jax.Array:
        """contract.md ``target_features``: (B, S, S, 3) normalized images -> (B, num_pooled_tokens, D) float32."""
        return adaptive_avg_pool_tokens(self.features(images), math.isqrt(self.cfg.num_pooled_tokens))

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.target_features(images)
