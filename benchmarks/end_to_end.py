"""End-to-end seconds per image: prompt -> condition -> 30-step guided DiT -> 50-step guided decoder -> pixels.

    PYTHONPATH=. .venv/bin/python benchmarks/end_to_end.py [--configs tiny,mid] [--rounds 3] [--cpus N]

For each config, the PyTorch worker builds one set of random-weight modules (transformers Qwen2.5-VL,
diffusers LuminaNextDiT2DModel + caption MLP, diffusers UNet2DConditionModel + AutoencoderKL +
EulerDiscreteScheduler) and writes them as a released-layout checkpoint directory with a
diffusion-decoder/ folder; the JAX worker loads that directory with ``inference.Pipeline`` (the code
path of ``python -m blip3o_jax.generate``). The PyTorch reference pipeline runs the same steps with the
same modules (docs/model.md 3.1 / 7 / 9: [IMG] + queries after the prompt, final-norm states, DiT Euler
loop with CFG batch [uncond, cond], decoder Euler loop with CFG batch [cond, uncond], VAE decode); both
compute the negative features once before timing (cached in both pipelines), float32, batch 1, sdpa
attention. Each side runs in its own process (benchmarks/fair.py: alternating rounds, medians, warm-up
and JAX compilation excluded and reported as "first call"). ``--cpus 1`` pins both workers to one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import fair  # noqa: E402
from blip3o_jax.models.dit import DiTConfig  # noqa: E402  (a dataclass: jax is imported, never started)

PROMPT = "a small red circle at the top left"

CONFIGS = {
    # the test-suite sizes: 16 px images
    "tiny": dict(
        qwen=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
        dit=DiTConfig(input_size=4, patch_size=1, in_channels=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                      multiple_of=32, latent_embedding_size=64),
        n_query=8,
        unet=dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                  attention_head_dim=(2, 2), addition_time_embed_dim=8, norm_num_groups=8),
        vae=dict(block_out_channels=(8, 16), norm_num_groups=4),
    ),
    # SDXL block structure at reduced width, 256 px images (latent 32), 64 query / 64 target tokens
    "mid": dict(
        qwen=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        dit=DiTConfig(input_size=8, patch_size=1, in_channels=256, dim=512, n_layers=8, n_heads=8, n_kv_heads=8,
                      multiple_of=256, latent_embedding_size=512),
        n_query=64,
        unet=dict(sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), addition_time_embed_dim=64,
                  norm_num_groups=32),
        vae=dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32),
    ),
}


def build(name: str, root: str):
    """Random torch modules -> released-layout directory (+ tokenizer, diffusion-decoder)."""
    import json

    import tests.torch_shim  # noqa: F401  (lets transformers / diffusers import beside CPU torch)
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from blip3o_jax import checkpoints
    from blip3o_jax.models import dit_mapping
    from tests.references.blip3o import GEN_START, read_dir, tiny_tokenizer, write_dir
    from tests.references.decoder import EULER
    from tests.references.dit import build_reference, reference_state_dict
    from tests.references.qwen import EOS, IMAGE, PAD, V_END, V_START, VIDEO, flat_config

    spec = CONFIGS[name]
    q = dict(spec["qwen"])
    torch.manual_seed(0)
    qcfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=128, rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=0,
                         eos_token_id=EOS, pad_token_id=PAD,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=q.pop("mrope_section")),
                         **q),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=q["hidden_size"],
                           window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
        tie_word_embeddings=False,
    )
    qwen = Qwen2_5_VLForConditionalGeneration(qcfg).eval()
    qdir = os.path.join(root, "qwen")
    qwen.save_pretrained(qdir)
    tensors = read_dir(qdir)
    dcfg = spec["dit"]
    dit, cap = build_reference(dcfg, seed=1)
    tensors.update(reference_state_dict(dit, cap))
    queries = torch.randn(1, spec["n_query"], q["hidden_size"])
    tensors["model.latent_queries"] = queries.numpy()
    with open(os.path.join(qdir, "config.json")) as f:
        config = flat_config(json.load(f))
    config.update(model_type="blip3o_qwen", n_query=spec["n_query"], gen_start_token_id=GEN_START,
                  dit_config={k: getattr(dcfg, k) for k in dit_mapping.JSON_FIELDS} | {"ffn_dim_multiplier": None})
    path = os.path.join(root, "ckpt")
    write_dir(path, tensors, config, shard_bytes=1 << 30)
    tiny_tokenizer().save_pretrained(path)

    c = dcfg.in_channels
    u = spec["unet"]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=c, addition_embed_type="text_time",
                                projection_class_embeddings_input_dim=c + 6 * u["addition_time_embed_dim"],
                                use_linear_projection=True, **u).eval()
    nb = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * nb,
                        up_block_types=("UpDecoderBlock2D",) * nb, layers_per_block=1, latent_channels=4,
                        sample_size=u["sample_size"] * 2 ** (nb - 1), scaling_factor=0.13025, **spec["vae"]).eval()
    dec = os.path.join(path, checkpoints.DECODER_DIR)
    unet.save_pretrained(os.path.join(dec, "unet"))
    vae.save_pretrained(os.path.join(dec, "vae"))
    EulerDiscreteScheduler(**EULER).save_pretrained(os.path.join(dec, "scheduler"))
    qwen.set_attn_implementation("sdpa")
    return path, dict(qwen=qwen, dit=dit, cap=cap, queries=queries, unet=unet, vae=vae, dcfg=dcfg,
                      n_query=spec["n_query"])


def _image_size(name: str) -> int:
    """Pixels per side: the UNet's latent side times the VAE's downscaling (what the JAX decoder derives)."""
    spec = CONFIGS[name]
    return spec["unet"]["sample_size"] * 2 ** (len(spec["vae"]["block_out_channels"]) - 1)


def _ckpt(root: str, name: str) -> str:
    return os.path.join(root, name, "ckpt")


def torch_pipeline(root: str, name: str):
    """The reference pipeline of docs/model.md 3.1 steps 2-8 with the modules build() writes (batch 1)."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    from blip3o_jax.data import chat
    from tests.references.blip3o import GEN_START, tiny_tokenizer
    from tests.references.decoder import EULER

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    os.makedirs(os.path.join(root, name), exist_ok=True)
    path, m = build(name, os.path.join(root, name))
    assert path == _ckpt(root, name)
    size = _image_size(name)
    rope = get_2d_rotary_pos_embed_lumina(m["dcfg"].head_dim, 384, 384)

    def condition(ids):
        lm = m["qwen"].model.language_model
        ids = torch.cat([ids, torch.full((1, 1), GEN_START)], 1)
        embeds = torch.cat([lm.embed_tokens(ids), m["queries"]], 1)
        return lm(inputs_embeds=embeds).last_hidden_state[:, -m["n_query"]:]

    def features(z, steps=30, guidance=3.0):
        d = m["dcfg"]
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
        x = torch.randn(1, d.in_channels, d.input_size, d.input_size)
        cond = m["cap"](torch.cat([torch.zeros_like(z), z]))
        mask = torch.ones(2, z.shape[1])
        for t in sched.timesteps:
            v = m["dit"](hidden_states=torch.cat([x, x]), timestep=t.expand(2).long(), encoder_hidden_states=cond,
                         encoder_mask=mask, image_rotary_emb=rope, cross_attention_kwargs={}).sample
            vu, vc = v.chunk(2)
            x = sched.step(vu + guidance * (vc - vu), t, x).prev_sample
        return x.flatten(2).transpose(1, 2)  # (1, N, C) row-major

    def decode(feats, negative, steps=50, guidance=3.0):
        sched = EulerDiscreteScheduler(**EULER)
        sched.set_timesteps(steps)
        unet, vae = m["unet"], m["vae"]
        side = unet.config.sample_size
        lat = torch.randn(1, 4, side, side) * sched.init_noise_sigma
        ctx = torch.cat([feats, negative])
        added = dict(text_embeds=ctx.mean(1), time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                                    dtype=torch.float32))
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps = unet(inp, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            ec, eu = eps.chunk(2)
            lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
        image = vae.decode(lat / vae.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    ids = torch.tensor([tiny_tokenizer().encode(chat.t2i_prompt(PROMPT), add_special_tokens=False)])
    with torch.no_grad():  # cached before timing, as in the released pipeline (and the JAX one)
        negative = features(condition(torch.zeros((1, 0), dtype=torch.long)))

    @torch.no_grad()
    def run():
        return decode(features(condition(ids)), negative)

    return run


def jax_pipeline(root: str, name: str):
    import jax

    from blip3o_jax import inference

    pipe = inference.Pipeline.from_checkpoint(_ckpt(root, name), mesh=inference.inference_mesh(1))
    assert pipe.decoder.default_size == _image_size(name)
    jax.block_until_ready(pipe.negative_features())  # cached before timing, like the reference's

    return lambda: pipe.generate_images([PROMPT], seed=0)[0]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--rounds", type=int, default=3)
    fair.add_cpus_flag(p)
    args = p.parse_args(argv)
    env = fair.cpus_env(args)
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        q, d = spec["qwen"], spec["dit"]
        desc = (f"{name}: {_image_size(name)} px, LLM {q['hidden_size']}x{q['num_hidden_layers']}L, DiT {d.dim}x"
                f"{d.n_layers}L ({d.in_channels}-ch, {d.input_size ** 2} tokens), UNet {spec['unet']['block_out_channels']}")
        print(fair.header(f"End-to-end text -> image (benchmarks/end_to_end.py), {desc}"), flush=True)
        with tempfile.TemporaryDirectory() as root:
            kw = dict(root=root, name=name)
            fair.compare(f"{name}: s/image, batch 1", [
                fair.Side("PyTorch eager", "benchmarks.end_to_end:torch_pipeline", kw, env),
                fair.Side("JAX", "benchmarks.end_to_end:jax_pipeline", kw, env),
            ], rounds=args.rounds, per_round=1, warmup=1, unit="s")


if __name__ == "__main__":
    main()
