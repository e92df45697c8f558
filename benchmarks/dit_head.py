"""DiT head benchmark: JAX vs PyTorch eager on the same config (float32, CPU).
Usage: PYTHONPATH=. .venv/bin/python benchmarks/dit_head.py  (prints JAX/PyTorch ratios from one run)"""
import os, time, statistics
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import tests.torch_shim  # noqa
import numpy as np, jax, optax, torch
from flax import nnx
from blip3o_jax.models import flow
from blip3o_jax.models.dit import DiT, DiTConfig
from tests.references.dit import build_reference

cfg = DiTConfig(input_size=8, in_channels=256, dim=256, n_layers=4, n_heads=8, n_kv_heads=8, latent_embedding_size=256)
B, NQ = 16, 64
torch.set_num_threads(os.cpu_count())
rng = np.random.default_rng(0)
x0 = rng.standard_normal((B, 64, 256)).astype(np.float32)
z = rng.standard_normal((B, NQ, 256)).astype(np.float32)

def bench(fn, n):
    fn(); fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

# ---- JAX
model = DiT(cfg, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model, nnx.Param)
opt = optax.adamw(1e-4)
opt_state = opt.init(params)
@jax.jit
def train_step(params, opt_state, key):
    loss, g = jax.value_and_grad(lambda p: flow.flow_matching_loss(nnx.merge(graphdef, p), x0, z, key))(params)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, loss
state = [params, opt_state]
def jstep():
    p, o, l = train_step(state[0], state[1], jax.random.key(0)); l.block_until_ready(); state[0], state[1] = p, o
noise = rng.standard_normal((B, 64, 256)).astype(np.float32)
def jsample():
    flow.sample_features(model, z, noise).block_until_ready()

# ---- torch
dit, cap = build_reference(cfg)
dit.train(); cap.train()
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina
topt = torch.optim.AdamW(list(dit.parameters()) + list(cap.parameters()), lr=1e-4)
rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
x0t = torch.from_numpy(x0).reshape(B, 8, 8, 256).permute(0, 3, 1, 2).contiguous(); zt = torch.from_numpy(z)
mask = torch.ones(B, NQ)
def tstep():
    sig = torch.randint(1, 1001, (B,)).float() / 1000
    n = torch.randn_like(x0t); s = sig[:, None, None, None]
    keep = (torch.rand(B) >= 0.1).float()[:, None, None]
    xs = (1 - s) * x0t + s * n
    v = dit(hidden_states=xs, timestep=sig * 1000, encoder_hidden_states=cap(zt * keep), encoder_mask=mask,
            image_rotary_emb=rope, cross_attention_kwargs={}).sample
    loss = ((v.float() - (n - x0t)) ** 2).mean()
    topt.zero_grad(); loss.backward(); topt.step()
def tsample():
    sched = FlowMatchEulerDiscreteScheduler(); sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 30, 30))
    x = torch.from_numpy(noise).reshape(B, 8, 8, 256).permute(0, 3, 1, 2)
    with torch.no_grad():
        cond = cap(torch.cat([torch.zeros_like(zt), zt])); m2 = torch.ones(2 * B, NQ)
        for t in sched.timesteps:
            v = dit(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * B).long(), encoder_hidden_states=cond,
                    encoder_mask=m2, image_rotary_emb=rope, cross_attention_kwargs={}).sample
            vu, vc = v.chunk(2)
            x = sched.step(vu + 3.0 * (vc - vu), t, x).prev_sample

for name, jf, tf, n in [("train step (fwd+bwd+AdamW)", jstep, tstep, 10), ("30-step guided sampling", jsample, tsample, 3)]:
    tj = bench(jf, n); tt = bench(tf, n)
    print(f"{name}: jax {tj*1e3:.1f} ms, torch eager {tt*1e3:.1f} ms, speed-up {tt/tj:.2f}x", flush=True)
