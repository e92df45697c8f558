"""diffusers' LuminaNextDiT2DModel + caption-projection MLP, the DiT head's reference (docs/model.md 5),
randomised, its state dict in the released key names, and the converter path back into the JAX DiT."""

from __future__ import annotations

import numpy as np
import torch

from blip3o_jax import sharding, weights
from blip3o_jax.models import dit_mapping
from blip3o_jax.models.dit import DiT, DiTConfig


def build_reference(cfg: DiTConfig, seed: int = 0):
    """(diffusers LuminaNextDiT2DModel with width-D cross-attention, caption-projection MLP), randomised."""
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import PixArtAlphaTextProjection

    torch.manual_seed(seed)
    dit = LuminaNextDiT2DModel(
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        hidden_size=cfg.dim,
        num_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_kv_heads=cfg.n_kv_heads,
        multiple_of=cfg.multiple_of,
        ffn_dim_multiplier=cfg.ffn_dim_multiplier or None,
        norm_eps=cfg.norm_eps,
        learn_sigma=False,
        qk_norm=cfg.qk_norm,
        cross_attention_dim=cfg.dim,
    ).eval()
    cap = PixArtAlphaTextProjection(cfg.latent_embedding_size, cfg.dim, act_fn="gelu_tanh").eval()
    with torch.no_grad():
        dit.pad_token.zero_()  # torch.empty: uninitialised memory, unused by the forward
        for name, p in list(dit.named_parameters()) + list(cap.named_parameters()):
            if name.endswith("gate"):
                p.copy_(torch.randn_like(p))
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
    return dit, cap


def reference_state_dict(dit, cap, prefix: str = dit_mapping.PREFIX) -> dict[str, np.ndarray]:
    sd = {prefix + k: v.detach().numpy().copy() for k, v in dit.state_dict().items() if k != "pad_token"}
    sd.update({prefix + "caption_projection." + k: v.detach().numpy().copy() for k, v in cap.state_dict().items()})
    return sd


def reference_velocity(dit, cap, cfg: DiTConfig, x, t, z, grid):
    """diffusers call in BLIP3-o's conventions: x tokens (B, N, C) row-major -> (B, C, H, W), t fed as is."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    b, n, c = x.shape
    h, w = grid
    x_nchw = torch.from_numpy(np.asarray(x)).reshape(b, h, w, c).permute(0, 3, 1, 2)
    zt = torch.from_numpy(np.asarray(z))
    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384)  # BLIP3-o's fixed table, sliced inside
    with torch.no_grad():
        out = dit(
            hidden_states=x_nchw,
            timestep=torch.as_tensor(np.asarray(t)),
            encoder_hidden_states=cap(zt),
            encoder_mask=torch.ones(b, z.shape[1], dtype=torch.int32),
            image_rotary_emb=rope,
            cross_attention_kwargs={},
        ).sample
    return out.permute(0, 2, 3, 1).reshape(b, n, c).numpy()


def save_and_load(tmp_path, sd: dict[str, np.ndarray], cfg: DiTConfig, **kw) -> DiT:
    weights.save_safetensors_sharded(iter(sd.items()), tmp_path, max_shard_bytes=1 << 20)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    return dit_mapping.load(weights.TorchCheckpoint(tmp_path), cfg, mesh, "replicated", **kw)


TINY = DiTConfig(input_size=4, patch_size=1, in_channels=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                 multiple_of=32, latent_embedding_size=48)
