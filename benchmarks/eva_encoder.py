"""EVA-CLIP target-encoder forward on CPU: JAX (this project) vs timm ``Eva``, same work, each in its own process.

    PYTHONPATH=. .venv/bin/python benchmarks/eva_encoder.py [--rounds 5] [--no-compile] [--batch 4] [--cpus N]

Config (BENCHMARKS.md): 224 px, patch 14, width 768, 12 post-norm layers, MLP 6582, batch 4, float32
(JAX bfloat16 compute as an extra row). Both sides compute the BLIP3-o target: the last block's tokens,
CLS dropped, no final norm, 4x4 average pooling (timm: ``forward_intermediates(norm=False)`` +
``avg_pool2d``), from the same weights (the timm worker writes them, the JAX worker loads them through
eva_mapping) and the same host-drawn images. ``torch.compile`` row: inductor on that function, compiled
in the warm-up calls.

Factories import their framework lazily: benchmarks.fair runs each in a process of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import fair  # noqa: E402

EVA = dict(image_size=224, patch_size=14, width=768, layers=12, head_width=64, mlp_ratio=8.571428571428571,
           pooling="early_pool2d_4")


def _images(batch: int):
    import numpy as np

    return np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)


def timm_forward(weights_dir: str, batch: int, compile: bool = False):
    import tests.torch_shim  # noqa: F401
    import torch
    from safetensors.torch import save_file
    from timm.models.eva import Eva

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    tm = Eva(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=EVA["mlp_ratio"],
             use_post_norm=True, num_classes=0, global_pool="token").eval()
    if not os.path.exists(os.path.join(weights_dir, "model.safetensors")):
        save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, os.path.join(weights_dir, "model.safetensors"))
    x = torch.from_numpy(_images(batch)).permute(0, 3, 1, 2).contiguous()

    def target(x):
        (g,) = tm.forward_intermediates(x, indices=[EVA["layers"] - 1], norm=False, intermediates_only=True)
        return torch.nn.functional.avg_pool2d(g, 4, 4)

    fn = torch.compile(target) if compile else target

    def run():
        with torch.inference_mode():
            return fn(x)

    return run


def jax_forward(weights_dir: str, batch: int, dtype: str = "float32"):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from blip3o_jax import sharding
    from blip3o_jax.models import eva_mapping
    from blip3o_jax.models.eva_clip import EvaConfig, EvaVisionTransformer
    from blip3o_jax.weights import TorchCheckpoint

    cfg, dt = EvaConfig(**EVA), jnp.dtype(dtype)
    if weights_dir:
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        model = eva_mapping.load(TorchCheckpoint(weights_dir), cfg, mesh, "replicated", dtype=dt)
    else:  # random weights (benchmarks/cpu_levers.py): the same work
        model = EvaVisionTransformer(cfg, dtype=dt, rngs=nnx.Rngs(0))
    gd, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(gd, s).target_features(x))
    x = jax.device_put(_images(batch), jax.devices()[0])
    return lambda: fwd(state, x).block_until_ready()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    fair.add_cpus_flag(p)
    args = p.parse_args(argv)
    env = fair.cpus_env(args)
    print(fair.header("EVA-CLIP target encoder (benchmarks/eva_encoder.py)",
                      f"config {EVA}, batch {args.batch}"))
    with tempfile.TemporaryDirectory() as wdir:
        kw = dict(weights_dir=wdir, batch=args.batch)
        sides = [fair.Side("timm eager float32", "benchmarks.eva_encoder:timm_forward", kw, env),
                 fair.Side("JAX float32", "benchmarks.eva_encoder:jax_forward", kw, env),
                 fair.Side("JAX bfloat16 compute", "benchmarks.eva_encoder:jax_forward", dict(kw, dtype="bfloat16"), env)]
        if not args.no_compile:
            sides.append(fair.Side("timm torch.compile", "benchmarks.eva_encoder:timm_forward", dict(kw, compile=True),
                                   env))
        fair.compare(f"forward (target features), batch {args.batch}", sides, rounds=args.rounds, per_round=1,
                     warmup=2, per_item=args.batch)


if __name__ == "__main__":
    main()
