"""DiT flow head on CPU: JAX vs PyTorch (diffusers LuminaNextDiT2DModel), same work, each in its own process.

    PYTHONPATH=. .venv/bin/python benchmarks/dit_head.py [--no-compile] [--rounds 5] [--cpus N]

Config (issue 22): dim 256, 4 layers, 8 heads, 64 target tokens (8x8, patch 1) of width 256, 64 condition
tokens of width 256, float32, the same converted weights on both sides (the PyTorch worker writes them,
the JAX worker loads them through dit_mapping).
- train step: forward + backward of the MSE between the predicted and the target velocity, batch 16, no
  optimizer on either side (all parameter gradients materialised). The noisy input, timesteps, dropped
  condition and target are drawn once on the host and fed to both, so both do exactly the same work.
- sampling: 30 guided Euler steps (CFG 3.0, [uncond; cond] batched), batch 2. PyTorch: diffusers'
  FlowMatchEulerDiscreteScheduler loop; JAX: ``flow.sample_features`` (one compiled fori_loop).
Both sides use the 8x8 grid's RoPE table (the reference's 384x384 table, sliced inside, is the same
numbers). ``torch.compile`` rows: inductor on the model call; its compilation is in the warm-up calls,
excluded from the medians like jax.jit's. ``--cpus 1`` pins every worker to one core (both frameworks then
run one thread: on a loaded machine that avoids OpenMP's spin-waiting collapse, see BENCHMARKS.md).

Factories below import their framework lazily: benchmarks.fair runs each in a process of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import fair  # noqa: E402

CFG = dict(input_size=8, in_channels=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=8, latent_embedding_size=256)
TRAIN_BATCH, SAMPLE_BATCH, NQ, STEPS, GUIDANCE = 16, 2, 64, 30, 3.0


def _inputs(batch: int):
    """The host-drawn inputs both sides use: x_sigma, t (0..1000), condition (10% zeroed), target."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, c = CFG["input_size"] ** 2, CFG["in_channels"]
    x0 = rng.standard_normal((batch, n, c)).astype(np.float32)
    noise = rng.standard_normal((batch, n, c)).astype(np.float32)
    z = rng.standard_normal((batch, NQ, CFG["latent_embedding_size"])).astype(np.float32)
    sigma = (rng.integers(1, 1001, batch) / 1000).astype(np.float32)
    keep = (rng.random(batch) >= 0.1).astype(np.float32)
    s = sigma[:, None, None]
    return dict(x_sigma=(1 - s) * x0 + s * noise, t=sigma * 1000, z=z * keep[:, None, None], target=noise - x0,
                noise=noise, z_clean=z)


# ---------------------------------------------------------------------------------------------
# PyTorch


def _torch_model(weights_dir: str, compile: bool):
    import tests.torch_shim  # noqa: F401
    import torch
    from blip3o_jax.models.dit import DiTConfig
    from blip3o_jax import weights
    from tests.references.dit import build_reference, reference_state_dict

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = DiTConfig(**CFG)
    dit, cap = build_reference(cfg)
    if not os.path.exists(os.path.join(weights_dir, "done")):
        weights.save_safetensors_sharded(iter(reference_state_dict(dit, cap).items()), weights_dir,
                                         max_shard_bytes=1 << 30)
        open(os.path.join(weights_dir, "done"), "w").close()
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, cfg.input_size, cfg.input_size)
    g = cfg.input_size

    def velocity(x_tokens, t, c):
        b = x_tokens.shape[0]
        x = x_tokens.reshape(b, g, g, -1).permute(0, 3, 1, 2)
        out = dit(hidden_states=x, timestep=t, encoder_hidden_states=c, encoder_mask=torch.ones(b, c.shape[1]),
                  image_rotary_emb=rope, cross_attention_kwargs={}).sample
        return out.permute(0, 2, 3, 1).reshape(b, g * g, -1)

    return torch, dit, cap, (torch.compile(velocity) if compile else velocity)


def torch_train(weights_dir: str, compile: bool = False):
    torch, dit, cap, velocity = _torch_model(weights_dir, compile)
    dit.train()
    cap.train()
    params = list(dit.parameters()) + list(cap.parameters())
    d = {k: torch.from_numpy(v) for k, v in _inputs(TRAIN_BATCH).items()}

    def step():
        for p in params:
            p.grad = None
        loss = ((velocity(d["x_sigma"], d["t"], cap(d["z"])) - d["target"]) ** 2).mean()
        loss.backward()
        return loss.item()

    return step


def torch_sample(weights_dir: str, compile: bool = False):
    torch, dit, cap, velocity = _torch_model(weights_dir, compile)
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    d = _inputs(SAMPLE_BATCH)
    noise, z = torch.from_numpy(d["noise"]), torch.from_numpy(d["z_clean"])

    @torch.no_grad()
    def sample():
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS))
        cond = cap(torch.cat([torch.zeros_like(z), z]))
        x = noise
        for t in sched.timesteps:
            v = velocity(torch.cat([x, x]), t.expand(2 * SAMPLE_BATCH).long(), cond)
            vu, vc = v.chunk(2)
            x = sched.step(vu + GUIDANCE * (vc - vu), t, x).prev_sample
        return x

    return sample


# ---------------------------------------------------------------------------------------------
# JAX


def _jax_model(weights_dir: str):
    from flax import nnx

    from blip3o_jax import sharding, weights
    from blip3o_jax.models import dit_mapping
    from blip3o_jax.models.dit import DiT, DiTConfig

    if not weights_dir:  # random weights (benchmarks/cpu_levers.py): the same work
        return DiT(DiTConfig(**CFG), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    return dit_mapping.load(weights.TorchCheckpoint(weights_dir), DiTConfig(**CFG), mesh, "replicated")


def jax_train(weights_dir: str):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params = nnx.split(_jax_model(weights_dir), nnx.Param)
    d = {k: jnp.asarray(v) for k, v in _inputs(TRAIN_BATCH).items()}

    @jax.jit
    def grads(params, x, t, z, target):
        def loss(p):
            return jnp.mean(jnp.square(nnx.merge(graphdef, p).velocity(x, t, z) - target))
        return jax.value_and_grad(loss)(params)

    def step():
        jax.block_until_ready(grads(params, d["x_sigma"], d["t"], d["z"], d["target"]))

    return step


def jax_sample(weights_dir: str):
    import jax
    import jax.numpy as jnp
    from blip3o_jax.models import flow

    model = _jax_model(weights_dir)
    d = _inputs(SAMPLE_BATCH)
    noise, z = jnp.asarray(d["noise"]), jnp.asarray(d["z_clean"])

    def sample():
        jax.block_until_ready(flow.sample_features(model, z, noise, STEPS, GUIDANCE))

    return sample


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--cases", default="train,sample")
    fair.add_cpus_flag(p)
    args = p.parse_args(argv)
    env = fair.cpus_env(args)
    print(fair.header("DiT flow head (benchmarks/dit_head.py)",
                      f"config {CFG}, train batch {TRAIN_BATCH}, sampling batch {SAMPLE_BATCH}, float32"))
    with tempfile.TemporaryDirectory() as wdir:
        kw = dict(weights_dir=wdir)
        for case, per_round in (("train", 3), ("sample", 1)):
            if case not in args.cases.split(","):
                continue
            sides = [fair.Side("PyTorch eager", f"benchmarks.dit_head:torch_{case}", kw, env),
                     fair.Side("JAX", f"benchmarks.dit_head:jax_{case}", kw, env)]
            if not args.no_compile:
                sides.append(fair.Side("torch.compile", f"benchmarks.dit_head:torch_{case}", dict(kw, compile=True), env))
            title = ("train step (fwd + bwd, MSE on velocity), batch 16" if case == "train"
                     else f"{STEPS}-step guided sampling (CFG {GUIDANCE}), batch {SAMPLE_BATCH}")
            fair.compare(title, sides, rounds=args.rounds, per_round=per_round, warmup=3 if case == "train" else 2)


if __name__ == "__main__":
    main()
