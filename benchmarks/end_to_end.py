"""End-to-end seconds per image: prompt -> condition -> 30-step guided DiT -> 50-step guided decoder -> pixels.

    PYTHONPATH=. .venv/bin/python benchmarks/end_to_end.py [--configs tiny,mid] [--repeats 3]

For each config, one set of random-weight PyTorch modules is built (transformers Qwen2.5-VL, diffusers
LuminaNextDiT2DModel + caption MLP, diffusers UNet2DConditionModel + AutoencoderKL +
EulerDiscreteScheduler), written as a released-layout checkpoint directory with a diffusion-decoder/
folder, and loaded by ``inference.Pipeline`` (the code path of ``python -m blip3o_jax.generate``).
The PyTorch reference pipeline runs the same steps with the same modules (docs/model.md 3.1 / 7 / 9:
[IMG] + queries after the prompt, final-norm states, DiT Euler loop with CFG batch [uncond, cond],
decoder Euler loop with CFG batch [cond, uncond], VAE decode); both use negative features computed
once beforehand (cached in both pipelines), float32, batch 1, sdpa attention; PyTorch is timed at
1 thread and at one thread per core (``--torch-threads``): on a loaded machine multi-threaded eager
PyTorch collapses (oversubscribed spin-waits), so both are printed. Times are medians over
``--repeats`` runs after one warm-up (JAX compilation is reported separately as "first call").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tests.torch_shim  # noqa: E402,F401  (lets transformers / diffusers import beside CPU torch)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blip3o_jax import checkpoints, inference  # noqa: E402
from blip3o_jax.models import dit_mapping  # noqa: E402
from blip3o_jax.models.dit import DiTConfig  # noqa: E402
from tests.references.blip3o import GEN_START, read_dir, tiny_tokenizer, write_dir  # noqa: E402
from tests.references.decoder import EULER  # noqa: E402
from tests.references.dit import build_reference, reference_state_dict  # noqa: E402
from tests.references.qwen import EOS, IMAGE, PAD, V_END, V_START, VIDEO, flat_config  # noqa: E402

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
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

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


class TorchPipeline:
    """The reference pipeline of docs/model.md 3.1 steps 2-8 with the same modules (batch 1)."""

    def __init__(self, m, size: int):
        from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

        self.m, self.size = m, size
        self.rope = get_2d_rotary_pos_embed_lumina(m["dcfg"].head_dim, 384, 384)
        self.negative = None

    @torch.no_grad()
    def condition(self, ids):
        lm = self.m["qwen"].model.language_model
        ids = torch.cat([ids, torch.full((1, 1), GEN_START)], 1)
        embeds = torch.cat([lm.embed_tokens(ids), self.m["queries"]], 1)
        return lm(inputs_embeds=embeds).last_hidden_state[:, -self.m["n_query"]:]

    @torch.no_grad()
    def features(self, z, steps=30, guidance=3.0):
        from diffusers import FlowMatchEulerDiscreteScheduler

        d = self.m["dcfg"]
        sched = FlowMatchEulerDiscreteScheduler()
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
        x = torch.randn(1, d.in_channels, d.input_size, d.input_size)
        cond = self.m["cap"](torch.cat([torch.zeros_like(z), z]))
        mask = torch.ones(2, z.shape[1])
        for t in sched.timesteps:
            v = self.m["dit"](hidden_states=torch.cat([x, x]), timestep=t.expand(2).long(), encoder_hidden_states=cond,
                              encoder_mask=mask, image_rotary_emb=self.rope, cross_attention_kwargs={}).sample
            vu, vc = v.chunk(2)
            x = sched.step(vu + guidance * (vc - vu), t, x).prev_sample
        return x.flatten(2).transpose(1, 2)  # (1, N, C) row-major

    @torch.no_grad()
    def decode(self, feats, steps=50, guidance=3.0):
        from diffusers import EulerDiscreteScheduler

        sched = EulerDiscreteScheduler(**EULER)
        sched.set_timesteps(steps)
        unet, vae = self.m["unet"], self.m["vae"]
        side = unet.config.sample_size
        lat = torch.randn(1, 4, side, side) * sched.init_noise_sigma
        ctx = torch.cat([feats, self.negative])
        added = dict(text_embeds=ctx.mean(1), time_ids=torch.tensor([[self.size, self.size, 0, 0, self.size,
                                                                      self.size]] * 2, dtype=torch.float32))
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps = unet(inp, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            ec, eu = eps.chunk(2)
            lat = sched.step(eu + guidance * (ec - eu), t, lat).prev_sample
        image = vae.decode(lat / vae.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)

    def __call__(self, ids):
        if self.negative is None:  # cached, as in the released pipeline
            self.negative = self.features(self.condition(torch.zeros((1, 0), dtype=torch.long)))
        return self.decode(self.features(self.condition(ids)))


def timed(fn, repeats):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", default=f"1,{os.cpu_count()}",
                   help="PyTorch intra-op thread counts to measure (comma separated)")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.torch_threads.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    rows = []
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory() as root:
            path, mods = build(name, root)
            pipe = inference.Pipeline.from_checkpoint(path, mesh=inference.inference_mesh(1))
        size = pipe.decoder.default_size
        ids = torch.tensor([pipe.tokenizer.encode(inference.chat.t2i_prompt(PROMPT), add_special_tokens=False)])
        pipe.negative_features()  # cached before timing, like the reference's

        def jax_run():
            return pipe.generate_images([PROMPT], seed=0)[0]

        ref = TorchPipeline(mods, size)
        ref(ids)  # builds the cached negative
        j_first, j = timed(jax_run, args.repeats)
        torch_cols = []
        for n in threads:
            torch.set_num_threads(n)
            t = timed(lambda: ref(ids), args.repeats)[1]
            torch_cols.append(f"{t:.3f} s ({n} thr, **{t / j:.2f}x**)")
        q, d = mods["qwen"].config.text_config, mods["dcfg"]
        rows.append(f"| {name}: {size} px, LLM {q.hidden_size}x{q.num_hidden_layers}L, DiT {d.dim}x{d.n_layers}L "
                    f"({d.in_channels}-ch, {d.input_size ** 2} tokens), UNet {tuple(mods['unet'].config.block_out_channels)}"
                    f" | {j:.3f} s (first call {j_first:.1f} s) | " + " / ".join(torch_cols) + " |")
        print(rows[-1], flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("\n| config | JAX s/image | PyTorch s/image (threads, JAX speed-up) |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
