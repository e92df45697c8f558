"""The fused attention backends of models/attention.py against its ``xla`` path.

Splash runs here in Pallas interpret mode (the kernel's own code, on CPU); its sequences are padded
to multiples of 128 inside the adapter, so the lengths below are deliberately not multiples of 128.
Tolerance: float32 rounding, rtol 1e-6 with atol 2e-6 x max|xla| (measured: largest forward
difference 7e-7 x max, gradients 1e-6 x max; splash sums over keys in 128-blocks, xla in one pass).
The models are checked end to end on splash against xla at the same tolerance (the Qwen text model's
logits and KV-cache steps, the ViT, the DiT velocity), built from the config keys.
cuDNN cannot be lowered without a GPU: here only its selection is tested; on a GPU the cuDNN case runs
benchmarks/attention_gpu.py's bfloat16 check on small shapes. The TPU case of ``auto`` is checked
through an abstract TPU mesh.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.mesh import AbstractDevice
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from blip3o_jax import configlib, sharding
from blip3o_jax.models import attention
from blip3o_jax.models.attention import dot_product_attention, select_backend
from blip3o_jax.models.dit import DiT
from blip3o_jax.models.qwen2_5_vl import Qwen2_5_VL, text_position_ids
from blip3o_jax.models.qwen_vision import QwenVisionConfig, QwenVisionTower

RTOL, ATOL = 1e-6, 2e-6


def close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.abs(want).max())


def qkv(b=2, lq=200, lk=200, hq=4, hkv=2, d=32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s).astype(np.float32))
                 for s in ((b, lq, hq, d), (b, lk, hkv, d), (b, lk, hkv, d)))


LEFT_PADDING = np.where(np.arange(200)[None] >= np.array([[0], [37]]), 0, -1).astype(np.int32)  # row 1: 37 pads
# Windows of unequal size (traced ids), with padding tokens (-1) at the end of row 0.
WINDOWS = np.stack([np.repeat([0, 1, 2, 3, -1], [30, 64, 10, 80, 16]), np.repeat([0, 1, 2], [150, 1, 49])]).astype(np.int32)
# The same kind as host ids: splash's static block mask (the Qwen ViT's windows); -1 = padding.
STATIC = np.repeat([0, 1, 2, 3, 4, -1], [60, 64, 4, 50, 14, 8]).astype(np.int32)

CASES = {
    "cross_gqa": (dict(lq=130), {}),
    "causal_left_padding": ({}, dict(causal=True, kv_segment_ids=jnp.asarray(LEFT_PADDING))),
    "windows_traced": ({}, dict(q_segment_ids=jnp.asarray(WINDOWS), kv_segment_ids=jnp.asarray(WINDOWS))),
    "windows_static": ({}, dict(q_segment_ids=STATIC, kv_segment_ids=STATIC)),
    "causal_static_mha": (dict(hkv=4), dict(causal=True, q_segment_ids=STATIC, kv_segment_ids=STATIC)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_xla_forward_and_gradient(case):
    shape, kw = CASES[case]
    q, k, v = qkv(**shape)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))  # output cotangent
    (want, want_vjp), (got, got_vjp) = (
        jax.vjp(functools.partial(dot_product_attention, implementation=name, **kw), q, k, v) for name in ("xla", "splash"))
    close(got, want)
    for got_grad, want_grad in zip(got_vjp(w), want_vjp(w)):
        close(got_grad, want_grad)
    if case == "causal_left_padding":  # rows without a visible key are zeros, as on xla
        np.testing.assert_array_equal(np.asarray(got)[1, :37], 0.0)
    if case == "windows_static":
        np.testing.assert_array_equal(np.asarray(got)[:, -8:], 0.0)


def test_decode_step_stays_on_xla_exactly():
    """A KV-cache step (per-row query positions) is not a splash call: it runs the xla path, bit for bit."""
    q, k, v = qkv(lq=1, lk=300)
    visible = dict(causal=True, q_positions=jnp.array([[150], [299]]), kv_positions=jnp.arange(300),
                   kv_segment_ids=jnp.asarray(np.where(np.arange(300) >= 20, 0, -1)))
    assert select_backend("splash", q_shape=q.shape, kv_shape=k.shape, dtype=q.dtype, causal=True,
                          positions=True, segment_ids=True, on="tpu") == "xla"
    np.testing.assert_array_equal(np.asarray(dot_product_attention(q, k, v, implementation="splash", **visible)),
                                  np.asarray(dot_product_attention(q, k, v, **visible)))


def test_splash_under_shard_map_on_a_mesh():
    """Inside jit on a (data, fsdp, tensor) = (2, 2, 2) mesh: batch over data x fsdp, k/v heads over tensor."""
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    q, k, v = qkv(b=4, lq=140, lk=140)
    seg = jnp.asarray(np.where(np.arange(140)[None] >= np.array([[0], [5], [70], [139]]), 0, -1))
    f = jax.jit(functools.partial(dot_product_attention, causal=True, kv_segment_ids=seg, implementation="splash"))
    spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    with jax.set_mesh(mesh):
        got = f(*(jax.device_put(x, spec) for x in (q, k, v)))
        assert "shard_map" in str(f.trace(q, k, v).jaxpr)
    close(got, dot_product_attention(q, k, v, causal=True, kv_segment_ids=seg))


TOWER = QwenVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, fullatt_block_indexes=(1,),
                         out_hidden_size=24)
# Two images; 12 patches are one full 8-patch window plus a 4-patch one: windows of unequal size.
GRID = np.array([[1, 8, 12], [1, 12, 10]])


def test_vision_tower_window_contiguous_splash_matches_xla():
    """Reordered window-contiguous with static window/frame masks (and undone after the merger) on splash,
    processor order with traced segment ids on xla: the same outputs. (The reorder is a gather; the
    kernel's gradient with static windows is checked above.)"""
    close(*tower_outputs(GRID, seed=2))


def tower_outputs(grid, seed):
    """(splash, xla) outputs of the same random tower on random pixels of ``grid``."""
    n = int(np.prod(grid, axis=1).sum())
    pixels = jnp.asarray(np.random.default_rng(seed).standard_normal((n, 3 * 2 * 14 * 14)).astype(np.float32))
    outs = []
    for name in ("splash", "xla"):
        tower = QwenVisionTower(dataclasses.replace(TOWER, attention=name), rngs=nnx.Rngs(0))
        outs.append(nnx.jit(lambda tower, p: tower(p, grid))(tower, pixels))
    return outs


def test_vision_tower_batch_of_one_grid_splash_matches_xla():
    """Images of one grid run as a batch (B, N): splash reorders each image window-contiguous and undoes it
    per image; the same outputs as xla."""
    close(*tower_outputs(np.array([GRID[0]] * 2), seed=3))


def test_auto_picks_by_platform_and_length():
    long, short = dict(q_shape=(2, 4096, 28, 128), kv_shape=(2, 4096, 4, 128)), dict(q_shape=(2, 64, 28, 64),
                                                                                       kv_shape=(2, 64, 28, 64))
    bf16 = jnp.bfloat16
    assert select_backend("auto", **long, dtype=bf16, causal=True, segment_ids=True, on="tpu") == "splash"
    assert select_backend("auto", **short, dtype=bf16, on="tpu") == "xla"  # the DiT's 64 tokens
    assert select_backend("auto", **long, dtype=bf16, on="cpu") == "xla"
    assert select_backend("auto", **long, dtype=bf16, causal=True, on="gpu") == "cudnn"
    # cuDNN takes no segment ids (left-padded prompts), no float32, no explicit positions: xla.
    assert select_backend("auto", **long, dtype=bf16, causal=True, segment_ids=True, on="gpu") == "xla"
    assert select_backend("auto", **long, dtype=jnp.float32, on="gpu") == "xla"
    assert select_backend("cudnn", **long, dtype=bf16, causal=True, positions=True, on="gpu") == "xla"
    assert select_backend("splash", **short, dtype=bf16, on="cpu") == "splash"  # explicit: any length
    assert select_backend("xla", **long, dtype=bf16, on="tpu") == "xla"
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        select_backend("cudnn", **long, dtype=bf16, on="cpu")
    with pytest.raises(ValueError, match="model.llm.attention='fast'"):
        attention.check_implementation("fast", "model.llm.attention")


def test_platform_comes_from_the_mesh_not_the_default_backend():
    """During a TPU AOT compile jax.default_backend() is "cpu"; the context mesh's devices decide."""
    assert attention.platform() == jax.default_backend() == "cpu"
    tpu = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=AbstractDevice("TPU v5", 2, "tpu"))
    with jax.sharding.use_abstract_mesh(tpu):
        assert attention.platform() == "tpu"
        assert select_backend("auto", q_shape=(1, 4096, 16, 80), kv_shape=(1, 4096, 16, 80), dtype=jnp.bfloat16,
                              static_segments=True) == "splash"


def test_config_keys():
    cfg = configlib.base_config()
    assert cfg.model.attention == "auto" and configlib.component(cfg, "llm").attention == "auto"
    cfg.model.attention = "xla"
    cfg.model.vision.attention = "splash"  # a component's own key overrides model.attention
    assert configlib.component(cfg, "llm").attention == "xla"
    assert configlib.component(cfg, "vision").attention == "splash"
    cfg.model.dit.attention = "flash"
    with pytest.raises(configlib.ConfigError, match="model.dit.attention"):
        configlib.validate(cfg)


# ---------------------------------------------------------------------------------------------
# End to end through the models, built from the config keys as the trainer builds them


def tiny(section: str, fields: dict, **keys):
    """configlib.component(section) of base_config() with tiny sizes and model.attention / overrides."""
    cfg = configlib.base_config()
    configlib.assign(cfg.model[section], fields)
    for key, value in keys.items():
        configlib.assign(cfg.model if key == "attention" else cfg.model[key], {"attention": value})
    return configlib.component(cfg, section)


def randomised(model, seed: int):
    """Every parameter redrawn (matrices N(0, 0.15^2), vectors 1 + N(0, 0.1^2)): the 0.02 init leaves the
    attention almost uniform, which would hide a wrong mask."""
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [rng.normal(0.0, 0.15, x.shape) if x.ndim >= 2 else 1.0 + rng.normal(0.0, 0.1, x.shape) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, [jnp.asarray(x, jnp.float32) for x in leaves]))


@pytest.fixture
def splash_calls(monkeypatch):
    """How many attention calls went to the splash kernel (counted while tracing)."""
    calls = []
    kernel = attention._splash_attention
    monkeypatch.setattr(attention, "_splash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    return calls


LLM = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, mrope_section=(2, 3, 3))  # GQA 4/2, head_dim 16
PROMPT = 20  # padded to 128 inside splash


@nnx.jit
def prefill_and_step(model, ids, mask):
    """Logits of a KV-cache prefill of the prompt and of one greedy decode step (as decode._generate)."""
    text, (b, length) = model.model, ids.shape
    cache = text.init_cache(b, length + 1)
    cache["valid"] = cache["valid"].at[:, :length].set(mask > 0)
    positions = text_position_ids(mask)
    hidden, cache = text.forward_cached(model.embed(ids), positions, cache, 0)
    prefill = model.logits(hidden)
    token = jnp.argmax(prefill[:, -1], axis=-1)
    cache["valid"] = cache["valid"].at[:, length].set(True)
    hidden, _ = text.forward_cached(model.embed(token[:, None]), positions[:, :, -1:] + 1, cache, length)
    return prefill, model.logits(hidden)


def test_qwen_text_on_splash_matches_xla_and_decode_stays_on_xla(splash_calls):
    """model.attention=splash: lm_logits of a left-padded batch (causal + padding segment ids, 20 tokens
    padded to 128 in the kernel) agree with xla's to float32 rounding, padded rows included; the KV-cache
    prefill and decode step (explicit positions) run the xla path bit for bit."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, LLM["vocab_size"], (2, PROMPT))
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    ids[mask == 0] = 0
    logits, cached = {}, {}
    for name in ("xla", "splash"):
        model = randomised(Qwen2_5_VL(tiny("llm", LLM, attention=name), rngs=nnx.Rngs(0)), seed=3)
        before = len(splash_calls)
        logits[name] = np.asarray(model.lm_logits(ids, mask))
        assert len(splash_calls) - before == (name == "splash")  # one traced call: the scanned layer body
        before = len(splash_calls)
        cached[name] = [np.asarray(x) for x in prefill_and_step(model, jnp.asarray(ids), jnp.asarray(mask))]
        assert len(splash_calls) == before
    close(logits["splash"], logits["xla"])
    for got, want in zip(cached["splash"], cached["xla"]):
        np.testing.assert_array_equal(got, want)


DIT = dict(input_size=4, in_channels=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32,
           latent_embedding_size=48)  # 16 tokens, GQA 4/2, head_dim 16


def test_dit_velocity_on_splash_matches_xla(splash_calls):
    """model.dit.attention=splash over model.attention=xla (auto would keep the DiT's short sequences on
    xla): self-attention over 16 tokens and cross-attention to 6 caption tokens, both padded to 128."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 16, 32)).astype(np.float32))
    z = jnp.asarray(rng.standard_normal((2, 6, 48)).astype(np.float32))
    t = jnp.asarray([999.0, 250.0])
    out = {}
    for name in ("xla", "splash"):
        model = randomised(DiT(tiny("dit", DIT, attention="xla", dit=name), rngs=nnx.Rngs(0)), seed=4)
        out[name] = np.asarray(nnx.jit(lambda m, x, t, z: m.velocity(x, t, z))(model, x, t, z))
    assert len(splash_calls) == 2  # the scanned block's self- and cross-attention
    close(out["splash"], out["xla"])


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason=f"cuDNN needs an NVIDIA GPU (jax.default_backend() is {jax.default_backend()})")
@pytest.mark.parametrize("case", ["llm_causal_4096", "llm_left_padded_2048", "vit_full", "dit", "unet_cross"])
def test_cudnn_matches_xla_on_gpu(case):
    """The GPU benchmark's check on small shapes: cuDNN in bfloat16, forward and gradient, no further from
    the float32 xla reference than xla itself in bfloat16 (attention_gpu.within_tolerance says why)."""
    from benchmarks import attention_gpu

    shape = attention_gpu.CASES[case].scaled(8)
    report = attention_gpu.check(shape, "cudnn")
    # Left-padded prompts take the xla fallback (cuDNN has no segment ids): still checked, as configured.
    assert report["runs_as"] == ("xla" if "padded" in case else "cudnn"), report
    assert report["ok"], report
