"""transformers' Siglip2VisionModel built tiny with random weights (eager attention): the SigLIP2 target
encoder's reference."""

import torch

from blip3o_jax.models.siglip2 import Siglip2Config

BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=8)


def torch_model(cfg: Siglip2Config, seed: int):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel as TorchSiglip2

    torch.manual_seed(seed)
    tcfg = Siglip2VisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                               num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                               num_channels=cfg.num_channels, patch_size=cfg.patch_size, num_patches=cfg.num_patches,
                               layer_norm_eps=cfg.layer_norm_eps, vision_use_head=True)
    tcfg._attn_implementation = "eager"
    model = TorchSiglip2(tcfg).eval()
    with torch.no_grad():  # biases and norms are zero / one at init: randomise everything
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5 if "position" not in name else 0.5)
            else:
                p.normal_(0.0, 0.2)
    return model
