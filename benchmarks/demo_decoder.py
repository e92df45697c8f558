"""Training-step time of the demo's pixel-space UNet on CPU for several input layouts (BENCHMARKS.md).

Usage: PYTHONPATH=. .venv/bin/python benchmarks/demo_decoder.py [NAME ...]   (default: all layouts)

Each layout is the same UNet2DConditionModel class; only the grid it runs on differs: 32x32 RGB pixels,
or the picture packed 2x2 / 4x4 into channels (scheduler.space_to_depth, demo.decoder_pixel_patch).
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from blip3o_jax.decoder import scheduler  # noqa: E402
from blip3o_jax.decoder.unet import UNet2DConditionModel, UNetConfig  # noqa: E402

BATCH = 16
COMMON = dict(layers_per_block=1, cross_attention_dim=64, addition_time_embed_dim=16,
              projection_class_embeddings_input_dim=64 + 6 * 16, norm_num_groups=8,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
              attention_head_dim=(2, 4))
LAYOUTS = {  # name: (side, channels, blocks)
    "pixels32": (32, 3, (32, 64)),
    "patch2_32_64": (16, 12, (32, 64)),  # the demo's decoder
    "patch2_64_128": (16, 12, (64, 128)),
    "patch4_64_128": (16, 48, (64, 128)),
}


def measure(name: str) -> None:
    side, channels, blocks = LAYOUTS[name]
    cfg = UNetConfig(sample_size=side, in_channels=channels, out_channels=channels, block_out_channels=blocks,
                     **COMMON)
    unet = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(unet, nnx.Param)
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x0, feats, key):
        loss, grads = jax.value_and_grad(
            lambda p: scheduler.diffusion_loss(nnx.merge(graphdef, p), x0, feats, key))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((BATCH, side, side, channels)), jnp.float32)
    feats = jnp.asarray(rng.standard_normal((BATCH, 16, 64)), jnp.float32)
    t = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, x0, feats, jax.random.key(0))
    jax.block_until_ready(loss)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(10):
        params, opt_state, loss = step(params, opt_state, x0, feats, jax.random.key(i))
    jax.block_until_ready(loss)
    per_step = (time.perf_counter() - t) / 10
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{name:14s} {side}x{side}x{channels} blocks {blocks}: {n:,} parameters, first step {first:.1f} s, "
          f"step {per_step * 1e3:.0f} ms", flush=True)


if __name__ == "__main__":
    for layout in sys.argv[1:] or LAYOUTS:
        measure(layout)
