"""transformers' Qwen2.5-VL built tiny with random weights (the backbone's reference), the special
token ids of the tiny vocabulary, and the transformers-4.51 spelling of its config.json."""

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

VOCAB, EOS, PAD = 128, 1, 2
IMAGE, VIDEO, V_START, V_END = 100, 101, 102, 103


def tiny_hf(seed, *, heads, kv_heads, layers, tied, with_image=True):
    """A tiny Qwen2.5-VL with weights drawn large enough that logits are far from ties."""
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
            max_position_embeddings=512, bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, window_size=56,
            fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
        tie_word_embeddings=tied,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"
    model.model.visual.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.15)
            elif "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def flat_config(nested):
    """The transformers-4.51 spelling of a Qwen2.5-VL config.json: text fields at the top level,
    rope_theta + rope_scaling {type: mrope}, vision in_chans."""
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = dict(flat["vision_config"])
    vision["in_chans"] = vision.pop("in_channels")
    flat["vision_config"] = vision
    flat["model_type"] = "qwen2_5_vl"
    return flat
