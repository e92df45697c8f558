"""Pixel decoder (docs/model.md 9): SDXL-layout UNet, AutoencoderKL, Euler scheduler and the converter.

References = diffusers 0.42.1 ``UNet2DConditionModel`` built tiny with the SDXL layout features
(DownBlock2D / CrossAttnDownBlock2D / UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D / UpBlock2D,
``text_time`` addition embedding, per-block transformer depths (1, 2, 3), linear projections,
cross_attention_dim 32) and a tiny ``AutoencoderKL``, random weights (norm scales and biases perturbed
away from their init), written with ``save_pretrained`` into a ``diffusion-decoder/`` folder together
with an ``EulerDiscreteScheduler`` configured as docs/model.md 9, and loaded through
``decoder.mapping.load_decoder`` (unet_mapping / vae_mapping + weights.load_component). Float32; outputs compared
at rtol 1e-5 and atol = 1e-5 * max|reference|.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from blip3o_jax.decoder import scheduler as sched
from blip3o_jax import sharding, weights
from blip3o_jax.decoder import mapping as dm
from blip3o_jax.decoder import unet_mapping, vae_mapping
from blip3o_jax.decoder.unet import UNet2DConditionModel, UNetConfig
from tests.references.decoder import EULER, TINY_UNET, perturb

torch = pytest.importorskip("torch")

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.13025,
)
B, SIDE, TOKENS = 2, 16, 5  # latent batch, latent side, target tokens (64 in the released model)
GUIDED_STEPS = 5


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel as TorchUNet

    root = tmp_path_factory.mktemp("diffusion-decoder")
    torch.manual_seed(0)
    unet = perturb(TorchUNet(addition_embed_type="text_time", **TINY_UNET), 1)
    vae = perturb(AutoencoderKL(**TINY_VAE), 2)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    EulerDiscreteScheduler(**EULER).save_pretrained(root / "scheduler")
    return root, unet, vae


@pytest.fixture(scope="module")
def one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def loaded(decoder_dir, one_device_mesh):
    root, _, _ = decoder_dir
    return dm.load_decoder(root, one_device_mesh)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(
        sample=rng.standard_normal((B, SIDE, SIDE, 4)).astype(np.float32),
        t=np.array([981.0, 21.0], np.float32),
        context=rng.standard_normal((B, TOKENS, 32)).astype(np.float32),
        uncond=rng.standard_normal((1, TOKENS, 32)).astype(np.float32),
        time_ids=np.array([[128, 128, 0, 0, 128, 128], [96, 128, 8, 4, 128, 128]], np.float32),
    )


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(x):
    return np.transpose(x.detach().numpy(), (0, 2, 3, 1))


def _close(actual, ref, rtol=1e-5):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(actual), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# Parity


def test_configs_parsed(loaded):
    unet, vae, scfg = loaded
    assert unet.cfg == UNetConfig(**TINY_UNET)
    assert vae.cfg.block_out_channels == (16, 32) and vae.cfg.scaling_factor == 0.13025
    assert scfg == sched.SchedulerConfig()  # the tiny folder's scheduler is docs/model.md 9's


def test_unet_parity(decoder_dir, loaded, inputs):
    _, ref, _ = decoder_dir
    unet = loaded[0]
    with torch.no_grad():
        expected = ref(
            _nchw(inputs["sample"]),
            torch.from_numpy(inputs["t"]),
            encoder_hidden_states=torch.from_numpy(inputs["context"]),
            added_cond_kwargs={
                "text_embeds": torch.from_numpy(inputs["context"].mean(1)),
                "time_ids": torch.from_numpy(inputs["time_ids"]),
            },
        ).sample
    pooled = jnp.asarray(inputs["context"]).mean(1)
    out = nnx.jit(lambda m, *a: m(*a))(
        unet, inputs["sample"], inputs["t"], inputs["context"], pooled, inputs["time_ids"]
    )
    _close(out, _nhwc(expected))


def test_vae_parity(decoder_dir, loaded):
    _, _, ref = decoder_dir
    vae = loaded[1]
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((B, 4, 4, 4)).astype(np.float32)
    images = np.tanh(rng.standard_normal((B, 16, 16, 3))).astype(np.float32)
    with torch.no_grad():
        dec = ref.decode(_nchw(latents)).sample
        mean = ref.encode(_nchw(images)).latent_dist.mean
    _close(nnx.jit(lambda m, z: m.decode(z))(vae, latents), _nhwc(dec))
    _close(nnx.jit(lambda m, x: m.encode(x)[0])(vae, images), _nhwc(mean))


@pytest.mark.parametrize("steps", [50, 30, 7, 1])
def test_euler_tables(steps):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**EULER)
    ref.set_timesteps(steps)
    timesteps, sigmas, init = sched.euler_tables(steps)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(init, float(ref.init_noise_sigma), rtol=1e-6)
    if steps == 50:
        assert timesteps[0] == 981 and timesteps[-1] == 1 and np.all(np.diff(timesteps) == -20)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_euler_steps_match_diffusers(prediction_type):
    """The Euler update for each prediction type, on made-up model outputs, vs EulerDiscreteScheduler.step."""
    from diffusers import EulerDiscreteScheduler

    steps = 7
    ref = EulerDiscreteScheduler(**dict(EULER, prediction_type=prediction_type))
    ref.set_timesteps(steps)
    _, sigmas, init = sched.euler_tables(steps)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32) * init
    x_ref = torch.from_numpy(x)
    for i, t in enumerate(ref.timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
        x = np.asarray(sched.euler_step(jnp.asarray(x), jnp.asarray(out), sigmas[i], sigmas[i + 1], prediction_type))
        _close(x, x_ref.numpy())


def test_velocity_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    rng = np.random.default_rng(6)
    x0, noise = (rng.standard_normal((3, 4, 4, 3)).astype(np.float32) for _ in range(2))
    t = np.asarray([0, 500, 999])
    want = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    _close(sched.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)), want)


def test_guided_euler_loop(decoder_dir, loaded, inputs):
    """5 Euler steps with CFG 3.0 ([cond, uncond]) from identical noise vs a diffusers-scheduler torch loop."""
    from diffusers import EulerDiscreteScheduler

    _, ref, _ = decoder_dir
    steps, g, px = GUIDED_STEPS, 3.0, 2 * SIDE  # 2 * SIDE: pixels of the tiny VAE (shares the compiled loop below)
    noise = np.random.default_rng(2).standard_normal((B, SIDE, SIDE, 4)).astype(np.float32)
    cond, uncond = inputs["context"], inputs["uncond"]

    ts = EulerDiscreteScheduler(**EULER)
    ts.set_timesteps(steps)
    ctx = torch.from_numpy(np.concatenate([cond, np.repeat(uncond, B, 0)]))
    ids = torch.tensor([[px, px, 0, 0, px, px]], dtype=torch.float32).repeat(2 * B, 1)
    x = _nchw(noise) * ts.init_noise_sigma
    with torch.no_grad():
        for t in ts.timesteps:
            x_in = ts.scale_model_input(torch.cat([x, x]), t)
            added = {"text_embeds": ctx.mean(1), "time_ids": ids}
            eps = ref(x_in, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            eps_c, eps_u = eps.chunk(2)
            x = ts.step(eps_u + g * (eps_c - eps_u), t, x).prev_sample

    out = sched.denoise(loaded[0], cond, uncond, noise, pixel_size=(px, px), num_steps=steps, guidance_scale=g)
    _close(out, _nhwc(x))


# ---------------------------------------------------------------------------------------------
# Converter


def test_released_layout_matches_diffusers():
    """docs/model.md 9's UNet (Emu2 / BLIP3-o decoder) and SDXL VAE built abstractly: every diffusers key and
    shape (a meta-device diffusers model with the same config) is covered by the Rule tables both ways."""
    import dataclasses

    from diffusers import AutoencoderKL, UNet2DConditionModel as TorchUNet

    from blip3o_jax.decoder.vae import VAEConfig

    with torch.device("meta"):
        ref_unet = TorchUNet(addition_embed_type="text_time", **dataclasses.asdict(UNetConfig()))
        vcfg = VAEConfig()
        ref_vae = AutoencoderKL(
            block_out_channels=vcfg.block_out_channels,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
        )
    assert sum(p.numel() for p in ref_unet.parameters()) == 2_525_520_644
    assert sum(p.numel() for p in ref_vae.parameters()) == 83_653_863
    for ref, cfg, cls in ((ref_unet, UNetConfig(), UNet2DConditionModel), (ref_vae, vcfg, dm.AutoencoderKL)):
        abstract = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        expected = weights.expected_torch_keys(unet_mapping.derive_rules(abstract), abstract)
        weights.check_coverage({k: tuple(v.shape) for k, v in ref.state_dict().items()}, expected)


def test_coverage_error_lists_every_key(decoder_dir, one_device_mesh, tmp_path):
    from safetensors.numpy import load_file, save_file

    root, _, _ = decoder_dir
    sd = load_file(os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
    del sd["conv_in.bias"]
    del sd["up_blocks.0.attentions.1.transformer_blocks.2.ff.net.2.weight"]
    sd["mid_block.extra.weight"] = np.zeros((3,), np.float32)
    sd["add_embedding.linear_1.weight"] = np.zeros((64 * 4, 7), np.float32)
    (tmp_path / "unet").mkdir()
    save_file(sd, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "unet" / "config.json").write_text((root / "unet" / "config.json").read_text())
    with pytest.raises(weights.CheckpointMismatchError) as err:
        unet_mapping.from_pretrained(tmp_path / "unet", one_device_mesh)
    e = err.value
    assert {k for k, _ in e.missing} == {
        "conv_in.bias",
        "up_blocks.0.attentions.1.transformer_blocks.2.ff.net.2.weight",
    }
    assert [k for k, _ in e.unexpected] == ["mid_block.extra.weight"]
    assert [k for k, *_ in e.mismatched] == ["add_embedding.linear_1.weight"]
    assert "conv_in.bias" in str(e) and "mid_block.extra.weight" in str(e)


def test_bf16_variant_and_legacy_vae_names(decoder_dir, one_device_mesh, tmp_path):
    """A folder holding only ``diffusion_pytorch_model.bf16.safetensors`` (as released) with pre-0.14 VAE
    attention names loads, each tensor equal to the bf16-rounded original."""
    from safetensors.torch import save_file

    _, _, ref = decoder_dir
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[k] = v.to(torch.bfloat16).contiguous()
    assert "decoder.mid_block.attentions.0.query.weight" in sd
    save_file(sd, tmp_path / "diffusion_pytorch_model.bf16.safetensors")
    config = json.loads((decoder_dir[0] / "vae" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    vae = vae_mapping.from_pretrained(tmp_path, one_device_mesh)
    got = dict(vae_mapping.export(vae))
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(got[k], v.to(torch.bfloat16).float().numpy(), err_msg=k)


def test_export_roundtrip(decoder_dir, loaded):
    _, ref, _ = decoder_dir
    got = dict(unet_mapping.export(loaded[0]))
    sd = ref.state_dict()
    assert set(got) == set(sd)
    for k in ("conv_in.weight", "down_blocks.2.attentions.1.transformer_blocks.2.attn2.to_k.weight"):
        np.testing.assert_array_equal(got[k], sd[k].numpy())


# ---------------------------------------------------------------------------------------------
# Sharding, sampling and training entry points


# A smaller UNet (two blocks, one of each kind) keeps compile times of the sampling loop and the
# gradient low; the parity tests above cover the full SDXL block layout.
SMALL_UNET = dict(
    TINY_UNET,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
)


@pytest.fixture(scope="module")
def mesh222():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def sharded_pixel_unet(mesh222):
    cfg = UNetConfig(**SMALL_UNET)
    factory = lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    return sharding.create_sharded(factory, mesh222, sharding.rules_for("fsdp"))


def test_sharded_pixel_space_decode(mesh222, sharded_pixel_unet):
    """Parameters born sharded on the (2, 2, 2) mesh; the guided sampling loop runs on pixels (no VAE)."""
    unet = sharded_pixel_unet
    specs = sharding.state_specs(nnx.state(unet, nnx.Param), sharding.rules_for("fsdp"))
    blk = specs["down_blocks"][1]["attentions"][0]["transformer_blocks"]
    assert blk["attn1"]["to_q"]["kernel"] == P(None, "fsdp", "tensor")  # no rule for "layers"
    assert blk["ff"]["proj_out"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["conv_in"]["kernel"] == P(None, None, None, "fsdp")
    assert unet.conv_in.kernel[...].sharding.spec == P(None, None, None, "fsdp")
    assert specs["conv_out"]["kernel"] == P(None, None, "fsdp", None)  # 3 image channels stay whole
    to_q = unet.down_blocks[1].attentions[0].transformer_blocks.attn1.to_q.kernel[...]
    assert to_q.sharding.spec == P(None, "fsdp", "tensor")

    cond = jnp.asarray(np.random.default_rng(3).standard_normal((2, TOKENS, 32)), jnp.float32)
    with jax.set_mesh(mesh222):
        images = sched.decode_features(
            unet, cond, jnp.zeros((1, TOKENS, 32)), jax.random.key(0), height=SIDE, width=SIDE, num_steps=2
        )
    assert images.shape == (2, SIDE, SIDE, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_diffusion_loss_and_grad(mesh222, sharded_pixel_unet):
    rng = np.random.default_rng(4)
    x0 = jnp.asarray(rng.uniform(-1, 1, (2, SIDE, SIDE, 3)), jnp.float32)
    cond = jnp.asarray(rng.standard_normal((2, TOKENS, 32)), jnp.float32)
    uncond = jnp.zeros((1, TOKENS, 32), jnp.float32)

    @nnx.jit
    def loss_and_grad(m, x0, cond):
        return nnx.value_and_grad(
            lambda m: sched.diffusion_loss(m, x0, cond, jax.random.key(1), uncond=uncond, cond_drop_prob=0.5)
        )(m)

    with jax.set_mesh(mesh222):
        loss, grads = loss_and_grad(sharded_pixel_unet, x0, cond)
    assert np.isfinite(float(loss)) and 0.1 < float(loss) < 10.0  # ε has unit variance
    g = grads["conv_in"]["kernel"][...]
    assert g.shape == sharded_pixel_unet.conv_in.kernel[...].shape and float(jnp.abs(g).max()) > 0


def test_latent_space_decode(loaded, inputs):
    """Latents (B, 16, 16, 4) -> the tiny VAE (downscale 2) -> (B, 32, 32, 3) in [0, 1]. Same shapes as the
    guided-loop test, so the compiled sampling loop is reused (only the VAE decode compiles)."""
    unet, vae, _ = loaded
    images = sched.decode_features(
        unet, inputs["context"], inputs["uncond"], jax.random.key(0), vae=vae, height=2 * SIDE, width=2 * SIDE,
        num_steps=GUIDED_STEPS,
    )
    assert images.shape == (B, 2 * SIDE, 2 * SIDE, 3)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0 and float(images.std()) > 0
