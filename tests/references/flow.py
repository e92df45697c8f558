"""diffusers' FlowMatchEulerDiscreteScheduler as BLIP3-o configures it, and the PyTorch reference of the
guided sampling loop (docs/model.md 7) over the diffusers DiT + caption MLP of tests/references/dit.py."""

import numpy as np
import torch


def scheduler(shift=1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def guided_sample(dit, cap, cfg, z: np.ndarray, noise: np.ndarray, num_steps: int, sched=None) -> np.ndarray:
    """docs/model.md 7 with diffusers' modules: [null; cond] batch (null = zeros), int64 timesteps, the
    scheduler's Euler step, guidance 3.0; noise and result as row-major tokens (B, N, C). ``sched``: a
    FlowMatchEulerDiscreteScheduler (default: BLIP3-o's, shift 1)."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    b, side, c = len(z), cfg.input_size, cfg.in_channels
    sched = sched or scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)
    x = torch.from_numpy(noise).reshape(b, side, side, c).permute(0, 3, 1, 2)
    zt = torch.from_numpy(z)
    with torch.no_grad():
        cond = cap(torch.cat([torch.zeros_like(zt), zt]))  # [uncond; cond]
        for t in sched.timesteps:
            v = dit(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * b).long(), encoder_hidden_states=cond,
                    encoder_mask=torch.ones(2 * b, z.shape[1]), image_rotary_emb=rope, cross_attention_kwargs={}).sample
            v_u, v_c = v.chunk(2)
            x = sched.step(v_u + 3.0 * (v_c - v_u), t, x).prev_sample
    return x.permute(0, 2, 3, 1).reshape(b, side * side, c).numpy()
