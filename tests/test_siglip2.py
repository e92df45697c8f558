"""SigLIP2 target encoder: parity with transformers' ``Siglip2VisionModel`` through the real converter.

The reference is built tiny with random weights (eager attention) and fed exactly what the SigLIP2
processor produces for fixed-size images: flattened patches from transformers'
``convert_image_to_patches``, an all-ones ``pixel_attention_mask`` and ``spatial_shapes``. Compared:
``hidden_states[feature_layer]``, ``last_hidden_state`` (after post_layernorm) and the features
adaptive-average-pooled with torch's ``F.adaptive_avg_pool2d``. Configs cover a position table equal
to, smaller than (upsampled) and larger than (antialiased downsampling) the image's patch grid.
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
from blip3o_jax.models import siglip2_mapping
from blip3o_jax.models.siglip2 import Siglip2Config, Siglip2VisionModel, adaptive_avg_pool_tokens
from blip3o_jax.weights import CheckpointMismatchError, TorchCheckpoint
from tests.references.siglip2 import BASE, torch_model

CONFIGS = {
    # same 4x4 grid as the table, penultimate layer pooled to 2x2; checkpoint under "vision_model."
    "same_grid": Siglip2Config(**BASE, num_patches=16, image_size=32, feature_layer=-2, num_pooled_tokens=4),
    # 6x6 patch grid from a 4x4 table (upsampling), last layer, non-divisible pooling 6 -> 4
    "upsample": Siglip2Config(**BASE, num_patches=16, image_size=48, feature_layer=-1, num_pooled_tokens=16),
    # 5x5 patch grid from an 8x8 table (antialiased downsampling), hidden_states[1], pooling 5 -> 2
    "downsample": Siglip2Config(**BASE, num_patches=64, image_size=40, feature_layer=1, num_pooled_tokens=4),
}


def _reference(model, cfg: Siglip2Config, images: np.ndarray):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    g = cfg.grid_size
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    pixel_values = torch.stack([convert_image_to_patches(im, cfg.patch_size) for im in chw])
    with torch.no_grad():
        out = model(pixel_values=pixel_values, pixel_attention_mask=torch.ones(len(images), g * g, dtype=torch.long),
                    spatial_shapes=torch.tensor([[g, g]] * len(images)), output_hidden_states=True)
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1  # embeddings + every layer
    feats = out.hidden_states[cfg.feature_layer]
    side = int(cfg.num_pooled_tokens**0.5)
    grid = feats.transpose(1, 2).reshape(len(images), cfg.hidden_size, g, g)
    pooled = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
    return feats.numpy(), pooled.numpy(), out.last_hidden_state.numpy()


def _save(sd, path, prefix=""):
    path.mkdir()
    tensors = {prefix + k: v.contiguous() for k, v in sd.items()}
    if prefix:  # a whole Siglip2Model file also holds the text tower and logit scale/bias
        tensors["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 2)
        tensors["logit_scale"] = torch.zeros(1)
    save_file(tensors, str(path / "model.safetensors"))
    return TorchCheckpoint(path)


def _load(ckpt, cfg, mesh, rule_table, **kw):
    return siglip2_mapping.load(ckpt, cfg, mesh, rule_table, **kw)


@nnx.jit
def _forward(model, images):
    return model.features(images), model.target_features(images), model.last_hidden_state(images)


def _close(actual, expected, rtol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def _make_case(name, tmp_path):
    cfg = CONFIGS[name]
    model = torch_model(cfg, seed=len(name))
    images = np.random.default_rng(0).normal(size=(4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    feats, pooled, last = _reference(model, cfg, images)
    prefix = "vision_model." if name == "same_grid" else ""
    ckpt = _save(model.state_dict(), tmp_path / "ckpt", prefix)
    return dict(cfg=cfg, images=images, feats=feats, pooled=pooled, last=last, ckpt=ckpt)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    return _make_case(request.param, tmp_path_factory.mktemp(request.param))


def test_parity_with_transformers(case, mesh1):
    cfg = case["cfg"]
    model = _load(case["ckpt"], cfg, mesh1, "replicated")
    feats, pooled, last = _forward(model, case["images"])
    assert pooled.shape == (4, cfg.num_pooled_tokens, cfg.hidden_size) and pooled.dtype == jnp.float32
    _close(feats, case["feats"])
    _close(pooled, case["pooled"])
    _close(last, case["last"])


def test_adaptive_pooling_matches_torch_non_divisible():
    x = np.random.default_rng(3).normal(size=(2, 7 * 7, 5)).astype(np.float32)
    for side in (1, 3, 4, 7):
        ref = F.adaptive_avg_pool2d(torch.from_numpy(x).transpose(1, 2).reshape(2, 5, 7, 7), side)
        ours = adaptive_avg_pool_tokens(jnp.asarray(x), side)
        np.testing.assert_allclose(np.asarray(ours), ref.flatten(2).transpose(1, 2).numpy(), rtol=1e-6, atol=1e-6)


def test_sharded_fsdp_tensor(tmp_path):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.rules_for("fsdp")
    cfg = CONFIGS["same_grid"]
    born = sharding.create_sharded(lambda: Siglip2VisionModel(cfg, rngs=nnx.Rngs(0)), mesh, rules)
    specs = {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(born))}
    assert specs["encoder/layers/self_attn/q_proj/kernel"] == P(None, "fsdp", "tensor")
    assert specs["encoder/layers/mlp/fc2/kernel"] == P(None, "tensor", "fsdp")
    assert specs["embeddings/position_embedding/embedding"] == P(None, "fsdp")
    assert specs["post_layernorm/scale"] == P(None)

    # The converted reference weights loaded straight into that sharding; jitted forward on a
    # batch split over (data, fsdp), with remat, still matches transformers.
    case = _make_case("same_grid", tmp_path)
    model = _load(case["ckpt"], cfg, mesh, "fsdp", remat="full")
    assert {"/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(nnx.state(model))} == specs
    batch = sharding.shard_host_batch({"images": case["images"]}, mesh)["images"]
    with jax.set_mesh(mesh):
        feats, pooled, last = _forward(model, batch)
    assert pooled.shape == (4, cfg.num_pooled_tokens, cfg.hidden_size)
    _close(feats, case["feats"])
    _close(pooled, case["pooled"])


def test_mismatched_checkpoint_lists_every_offender(tmp_path, mesh1):
    cfg = CONFIGS["upsample"]
    sd = torch_model(cfg, seed=0).state_dict()
    del sd["encoder.layers.2.mlp.fc2.weight"]
    sd["encoder.layers.0.self_attn.qkv.weight"] = torch.zeros(3, 3)
    sd["embeddings.position_embedding.weight"] = torch.zeros(64, cfg.hidden_size)
    with pytest.raises(CheckpointMismatchError) as err:
        _load(_save(sd, tmp_path / "bad"), cfg, mesh1, "replicated")
    msg = str(err.value)
    for key in ("encoder.layers.2.mlp.fc2.weight", "self_attn.qkv.weight", "embeddings.position_embedding.weight"):
        assert key in msg
    assert "head.probe" not in msg  # the unused attention-pooling head is a known, ignored extra


def test_feature_layer_validation():
    with pytest.raises(ValueError, match="feature_layer"):
        Siglip2VisionModel(dataclasses.replace(CONFIGS["same_grid"], feature_layer=-5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="square"):
        Siglip2VisionModel(dataclasses.replace(CONFIGS["same_grid"], num_pooled_tokens=8), rngs=nnx.Rngs(0))
