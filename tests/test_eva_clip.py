"""EVA-CLIP target encoder: parity with timm's ``Eva`` through the real converter, pooling, sharding.

The reference is timm 1.0.31 ``Eva`` built tiny with random weights (docs/model.md 8.2: post-norm, plain
GELU MLP, the released mlp_ratio 60/7, img_size != 224, separate q/v biases). Its last-block tokens
before the final norm, CLS dropped (``forward_intermediates(norm=False)``), and their torch
``avg_pool2d`` are compared with ``features`` / ``target_features`` after converting the state_dict
through safetensors + ``eva_mapping.load``, in timm's layout and in the released BLIP3-o layout.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.torch import save_file

from blip3o_jax import sharding
from blip3o_jax.models import eva_mapping
from blip3o_jax.models.eva_clip import EvaConfig, EvaVisionTransformer, avg_pool_tokens
from blip3o_jax.weights import CheckpointMismatchError, TorchCheckpoint
from tests.references.eva import RELEASED_RATIO, released_state_dict, timm_eva

CONFIGS = {
    # several grids, head widths, pool sizes and both block types; mlp_ratio as released (60/7)
    "p8_g4_pool2": EvaConfig(image_size=32, patch_size=8, width=32, layers=2, head_width=8,
                             mlp_ratio=RELEASED_RATIO, pooling="early_pool2d_2"),
    "p14_g4_pool4": EvaConfig(image_size=56, patch_size=14, width=48, layers=3, head_width=24,
                              mlp_ratio=RELEASED_RATIO, pooling="early_pool2d_4"),
    "p8_g8_pool4_prenorm": EvaConfig(image_size=64, patch_size=8, width=32, layers=2, head_width=16,
                                     mlp_ratio=RELEASED_RATIO, postnorm=False, pooling="early_pool2d_4"),
}


def _standalone_state_dict(timm_sd):
    """The EVA file layout: released names without prefix (fused qkv bias)."""
    n = len(eva_mapping.RELEASED_PREFIX)
    return {k[n:]: v for k, v in released_state_dict(timm_sd).items() if k.startswith(eva_mapping.RELEASED_PREFIX)}


def _save(sd, path):
    path.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return TorchCheckpoint(path)


def _load(ckpt, cfg, mesh, rule_table, **model_kw):
    return eva_mapping.load(ckpt, cfg, mesh, rule_table, **model_kw)


@nnx.jit
def _forward(model, images):
    return model.features(images), model.target_features(images)


def _close(actual, expected, rtol=1e-5):
    # atol relative to the output scale: elements near zero carry float32 rounding of the O(1) terms.
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    torch_model = timm_eva(cfg, seed=len(request.param))
    images = np.random.default_rng(0).normal(size=(2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        (grid,) = torch_model.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                    indices=[cfg.layers - 1], norm=False, intermediates_only=True)
        k = cfg.pool_size
        pooled = F.avg_pool2d(grid, k, k)  # (B, C, g/k, g/k), exactly BLIP3-o's early_pool2d_k
    ref_tokens = grid.flatten(2).transpose(1, 2).numpy()  # row-major (B, g*g, C)
    ref_pooled = pooled.flatten(2).transpose(1, 2).numpy()
    timm_sd = torch_model.state_dict()
    tmp = tmp_path_factory.mktemp(request.param)
    return dict(cfg=cfg, images=images, ref_tokens=ref_tokens, ref_pooled=ref_pooled, timm_sd=timm_sd,
                timm_ckpt=_save(timm_sd, tmp / "timm"), released_ckpt=_save(released_state_dict(timm_sd), tmp / "rel"),
                standalone_ckpt=_save(_standalone_state_dict(timm_sd), tmp / "standalone"))


@pytest.fixture(scope="module")
def timm_loaded(case, mesh1):
    return _load(case["timm_ckpt"], case["cfg"], mesh1, "replicated")


def test_timm_checkpoint_has_split_qv_bias_and_final_norm(case):
    keys = set(case["timm_sd"])
    assert "blocks.0.attn.q_bias" in keys and "blocks.0.attn.v_bias" in keys
    assert "blocks.0.attn.qkv.bias" not in keys and "norm.weight" in keys


@pytest.mark.parametrize("layout", ["timm", "released", "standalone"])
def test_parity_with_timm(case, layout, timm_loaded, mesh1):
    cfg = case["cfg"]
    if layout == "timm":
        model = timm_loaded
    else:
        model = _load(case[f"{layout}_ckpt"], cfg, mesh1, "replicated")
    tokens, pooled = _forward(model, case["images"])
    n = cfg.grid_size**2
    assert tokens.shape == (2, n, cfg.width) and pooled.shape == (2, n // cfg.pool_size**2, cfg.width)
    _close(tokens, case["ref_tokens"])
    _close(pooled, case["ref_pooled"])


def test_fused_bias_view_and_k_bias_is_zero(case):
    view = eva_mapping.FusedQkvBiasView(case["timm_ckpt"])
    w = case["cfg"].width
    bias = view.get("blocks.1.attn.qkv.bias")
    assert view.shape("blocks.1.attn.qkv.bias") == (3 * w,) and "blocks.1.attn.q_bias" not in view
    np.testing.assert_array_equal(bias[:w], case["timm_sd"]["blocks.1.attn.q_bias"].numpy())
    np.testing.assert_array_equal(bias[w:2 * w], 0.0)
    np.testing.assert_array_equal(bias[2 * w:], case["timm_sd"]["blocks.1.attn.v_bias"].numpy())


def test_export_round_trip_is_released_layout(case, timm_loaded):
    exported = dict(eva_mapping.export(timm_loaded))
    released = case["released_ckpt"]
    assert set(exported) == {k for k in released.keys() if k.startswith(eva_mapping.RELEASED_PREFIX)}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, released.get(key))


def test_pooling_is_row_major_kxk():
    g, k, c = 4, 2, 1
    tokens = jnp.arange(g * g, dtype=jnp.float32).reshape(1, g * g, c)  # token r*g+col holds its index
    pooled = avg_pool_tokens(tokens, k)[0, :, 0]
    # windows: rows 0-1 x cols 0-1 -> mean(0,1,4,5); rows 0-1 x cols 2-3 -> mean(2,3,6,7); ...
    np.testing.assert_array_equal(np.asarray(pooled), [2.5, 4.5, 10.5, 12.5])
    with pytest.raises(ValueError, match="cannot pool"):
        avg_pool_tokens(tokens, 3)


def test_bfloat16_inference_tracks_float32(case, mesh1):
    if case["cfg"] != CONFIGS["p8_g4_pool2"]:
        return  # one config is enough
    model = _load(case["released_ckpt"], case["cfg"], mesh1, "replicated", dtype=jnp.bfloat16)
    assert model.blocks.attn.qkv.kernel[...].dtype == jnp.float32  # param_dtype stays float32
    tokens, pooled = _forward(model, case["images"])
    assert tokens.dtype == jnp.bfloat16 and pooled.dtype == jnp.float32
    err = float(np.abs(np.asarray(pooled) - case["ref_pooled"]).max() / np.abs(case["ref_pooled"]).max())
    assert err < 3e-2, err


def test_sharded_fsdp_tensor_matches_reference(tmp_path):
    cfg = CONFIGS["p8_g4_pool2"]
    torch_model = timm_eva(cfg, seed=7)
    images = np.random.default_rng(2).normal(size=(4, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        (grid,) = torch_model.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                    indices=[cfg.layers - 1], norm=False, intermediates_only=True)
    ref_pooled = F.avg_pool2d(grid, 2, 2).flatten(2).transpose(1, 2).numpy()

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.rules_for("fsdp")
    born = sharding.create_sharded(lambda: EvaVisionTransformer(cfg, remat="full", rngs=nnx.Rngs(0)), mesh, rules)
    specs = {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(born))}
    assert specs["blocks/attn/qkv/kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks/mlp/fc2/kernel"] == P(None, "tensor", "fsdp")
    assert specs["pos_embed"] == P(None, None, "fsdp")
    assert specs["patch_embed/proj/kernel"] == P(None, None, None, "fsdp")
    assert specs["blocks/norm1/scale"] == P(None, None)

    model = _load(_save(torch_model.state_dict(), tmp_path / "timm"), cfg, mesh, "fsdp", remat="full")
    loaded = {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(model))}
    assert loaded == specs
    batch = sharding.shard_host_batch({"images": images}, mesh)["images"]
    with jax.set_mesh(mesh):
        _, pooled = _forward(model, batch)
    assert pooled.shape == (4, 4, cfg.width)
    _close(pooled, ref_pooled)


def test_mismatched_checkpoint_lists_every_offender(case, tmp_path, mesh1):
    cfg = case["cfg"]
    sd = dict(case["timm_sd"])
    del sd["blocks.1.mlp.fc1.bias"]
    sd["blocks.0.attn.rel_pos_bias"] = torch.zeros(3)
    sd["pos_embed"] = torch.zeros(1, 5, cfg.width)  # e.g. a 224-px checkpoint's position table
    with pytest.raises(CheckpointMismatchError) as err:
        _load(_save(sd, tmp_path / "bad"), cfg, mesh1, "replicated")
    msg = str(err.value)
    assert "blocks.1.mlp.fc1.bias" in msg and "blocks.0.attn.rel_pos_bias" in msg and "pos_embed" in msg
    assert "norm.weight" not in msg  # timm's final norm is a known, ignored extra


def test_config_validation():
    with pytest.raises(ValueError, match="unknown EVA pooling"):
        EvaVisionTransformer(dataclasses.replace(CONFIGS["p8_g4_pool2"], pooling="avg"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not tile"):
        EvaVisionTransformer(dataclasses.replace(CONFIGS["p8_g4_pool2"], pooling="early_pool2d_3"), rngs=nnx.Rngs(0))
