"""timm's ``Eva`` as BLIP3-o's EVA-CLIP target encoder (docs/model.md 8.2), randomised, and its state dict
in the released BLIP3-o layout."""

import torch

from blip3o_jax.models import eva_mapping
from blip3o_jax.models.eva_clip import EvaConfig

RELEASED_RATIO = 8.571428571428571


def timm_eva(cfg: EvaConfig, seed: int):
    """timm's Eva shaped by cfg, every parameter redrawn from the seed."""
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    model = Eva(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, use_post_norm=cfg.postnorm,
                num_classes=0, global_pool="token").eval()
    # timm zero-initialises biases and uses std 0.02 weights (near-uniform attention): draw everything
    # at a scale where attention, biases and norms all matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("pos_embed", "cls_token"):
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def released_state_dict(timm_sd):
    """timm names -> the released BLIP3-o layout: prefix, fused qkv bias [q, 0, v], no final norm."""
    out = {}
    for k, v in timm_sd.items():
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            v = torch.cat([v, torch.zeros_like(v), timm_sd[base + "v_bias"]])
            k = base + "qkv.bias"
        elif k.endswith("attn.v_bias") or k.startswith("norm."):
            continue
        out[eva_mapping.RELEASED_PREFIX + k] = v
    out["model.dit.model.x_embedder.weight"] = torch.zeros(2, 2)  # other BLIP3-o parts are not EVA's
    return out
