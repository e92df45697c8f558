"""Qwen2.5-VL vision tower, M-RoPE position ids and image processor against transformers 5.23.

The tower reference is transformers' Qwen2_5_VisionTransformerPretrainedModel (eager attention),
tiny, random weights, saved as a ``visual.*`` safetensors checkpoint and loaded through
qwen_vision_mapping.load (weights.load_component, the real converter path). Window size 56 with patch 14 / merge 2 makes
windows of 2x2 merged tokens, so the images below split into full and partial windows.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image
from safetensors.torch import save_file
from transformers import vision_utils
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from blip3o_jax import sharding, weights
from blip3o_jax.data.qwen_image_processor import QwenImageProcessor
from blip3o_jax.models import qwen_vision_mapping
from blip3o_jax.models.qwen_vision import QwenVisionConfig, get_rope_index, vision_layout

TINY = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, window_size=56,
            fullatt_block_indexes=(1, 3), out_hidden_size=64)
CFG = QwenVisionConfig(**TINY)
# Four inputs in one call: partial windows (3x5 merged), exactly one window (2x2), a two-frame clip
# (per-frame segments) and a tall image.
GRID = np.array([[1, 6, 10], [1, 4, 4], [2, 4, 6], [1, 10, 6]])
# Four images of one grid (a training batch): the tower runs them as a batch, attention per image.
UNIFORM_GRID = np.array([[1, 6, 10]] * 4)
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tcfg = Qwen2_5_VLVisionConfig(**{**TINY, "fullatt_block_indexes": list(TINY["fullatt_block_indexes"])})
    tcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel(tcfg).eval()
    with torch.no_grad():  # O(1) activations and non-trivial norm scales instead of the 0.02 init
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_q" in name
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm else 0.2 * torch.randn_like(p))
    pixels = np.random.RandomState(0).randn(int(GRID.prod(1).sum()), PATCH_DIM).astype(np.float32)
    uniform = np.random.RandomState(1).randn(int(UNIFORM_GRID.prod(1).sum()), PATCH_DIM).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), grid_thw=torch.from_numpy(GRID)).pooler_output.numpy()
        uniform_out = model(torch.from_numpy(uniform), grid_thw=torch.from_numpy(UNIFORM_GRID)).pooler_output.numpy()
    ckpt = tmp_path_factory.mktemp("qwen_visual")
    save_file({"visual." + k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    return types.SimpleNamespace(pixels=pixels, out=out, uniform=uniform, uniform_out=uniform_out,
                                 ckpt=weights.TorchCheckpoint(ckpt))


def load_tower(reference, mesh, rule_table, remat="none"):
    return qwen_vision_mapping.load(reference.ckpt, CFG, mesh, rule_table, remat=remat)


def forward(tower, pixels):
    return nnx.jit(lambda m, x: m(x, GRID))(tower, jnp.asarray(pixels))


def assert_close(out, ref):
    # float32; atol scaled to the output magnitude (max |ref| ~13): measured max abs error 1.1e-5
    # (9e-7 of the max), from summation order only.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=2e-6 * np.abs(ref).max())


@pytest.fixture(scope="module")
def one_device_mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def tower(reference, one_device_mesh):
    return load_tower(reference, one_device_mesh, "replicated")


def test_tower_matches_transformers(reference, tower):
    out = forward(tower, reference.pixels)
    assert out.shape == (int(GRID.prod(1).sum()) // 4, 64)
    assert_close(out, reference.out)


def test_images_of_one_grid_run_as_a_batch(reference):
    """A training batch's images (one grid) run batched, attention per image, sharded over the batch axes
    of a 2x2x2 mesh: transformers' output (one cu_seqlens sequence) at the same tolerance, and the same
    as running the images one by one."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tower = load_tower(reference, mesh, "fsdp")
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m(x, UNIFORM_GRID))(tower, jnp.asarray(reference.uniform))
    assert_close(out, reference.uniform_out)
    n = int(UNIFORM_GRID[0].prod())
    scores = str(jax.make_jaxpr(lambda x: nnx.merge(*nnx.split(tower))(x, UNIFORM_GRID))(reference.uniform))
    assert f"[4,2,{n},{n}]" in scores and f"{4 * n},{4 * n}]" not in scores  # (B, heads, N, N), not (4N, 4N)
    with jax.set_mesh(mesh):
        one = jnp.concatenate([nnx.jit(lambda m, x: m(x, UNIFORM_GRID[:1]))(tower, jnp.asarray(reference.uniform[i:i + n]))
                               for i in range(0, len(reference.uniform), n)])
    assert_close(out, np.asarray(one))


def test_remat_forward_and_grad(reference, one_device_mesh):
    tower = load_tower(reference, one_device_mesh, "replicated", remat="full")
    loss, grads = nnx.jit(nnx.value_and_grad(lambda m, x: jnp.sum(m(x, GRID) ** 2)))(
        tower, jnp.asarray(reference.pixels)
    )
    np.testing.assert_allclose(float(loss), float(np.sum(reference.out.astype(np.float64) ** 2)), rtol=1e-5)
    qkv = grads["blocks"]["attn"]["qkv"]["kernel"][...]
    assert qkv.shape == (4, 32, 96) and bool(jnp.all(jnp.isfinite(qkv))) and float(jnp.abs(qkv).max()) > 0


def test_sharded_tower(reference):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tower = load_tower(reference, mesh, "fsdp")
    specs = {
        "/".join(map(str, path)): v.get_value().sharding.spec for path, v in nnx.to_flat_state(nnx.state(tower))
    }
    assert specs["patch_embed/proj/kernel"] == P(None, None, None, None, "fsdp")
    assert specs["blocks/attn/qkv/kernel"] == P(None, "fsdp", "tensor")
    assert specs["blocks/attn/proj/kernel"] == P(None, "tensor", "fsdp")
    assert specs["blocks/mlp/down_proj/kernel"] == P(None, "tensor", "fsdp")
    assert specs["blocks/norm1/scale"] == P(None, None)
    assert specs["merger/mlp/layers/0/kernel"] == P("fsdp", "tensor")
    assert specs["merger/mlp/layers/2/kernel"] == P("tensor", "fsdp")
    with jax.set_mesh(mesh):
        out = forward(tower, reference.pixels)
    assert_close(out, reference.out)


def test_layout_matches_transformers_window_index():
    """Segment ids and rotary positions equal transformers' window order / cu_seqlens / positions."""
    grid = torch.from_numpy(GRID)
    layout = vision_layout(GRID, CFG)
    window_index, cu_window = vision_utils.get_vision_window_index(grid, 2, CFG.window_size, CFG.patch_size)
    order = (window_index.numpy()[:, None] * 4 + np.arange(4)).reshape(-1)  # token order inside transformers
    cu_window = cu_window.numpy()
    seg = layout["window_seg"][order]
    for a, b in zip(cu_window[:-1], cu_window[1:]):
        assert len(set(seg[a:b])) == 1
    assert len(set(seg[cu_window[:-1]])) == len(cu_window) - 1  # one distinct window per segment
    cu_full = vision_utils.get_vision_cu_seqlens(grid).numpy()
    np.testing.assert_array_equal(layout["frame_seg"], np.repeat(np.arange(len(cu_full) - 1), np.diff(cu_full)))
    np.testing.assert_array_equal(layout["pos_hw"], vision_utils.get_vision_position_ids(grid, 2).numpy())


def test_grid_must_match_pixels(tower):
    with pytest.raises(ValueError, match="patches"):
        tower(jnp.zeros((8, PATCH_DIM)), np.array([[1, 4, 4]]))


# ---------------------------------------------------------------------------------------------
# get_rope_index

IMG, START, END, PAD = 151655, 151652, 151653, 151643


def transformers_rope_index(input_ids, grid, mask):
    """Qwen2_5_VLModel.get_rope_index on a stand-in self (it only reads the vision config)."""
    stand_in = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=2)),
        get_vision_position_ids=lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(None, *a, **k),
    )
    ids = torch.tensor(input_ids)
    pos, deltas = Qwen2_5_VLModel.get_rope_index(
        stand_in,
        ids,
        mm_token_type_ids=(ids == IMG).int(),
        image_grid_thw=torch.tensor(grid) if grid is not None else None,
        attention_mask=torch.tensor(mask) if mask is not None else None,
    )
    return pos.numpy(), deltas.numpy()


def image(grid):
    return [START] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [END]


def batch(rows, side):
    length = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = [PAD] * (length - len(r))
        ids.append(r + pad if side == "right" else pad + r)
        mask.append([1] * len(r) + [0] * len(pad) if side == "right" else [0] * len(pad) + [1] * len(r))
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_index_matches_transformers(side):
    g1, g2, g3 = [1, 4, 6], [1, 6, 4], [1, 8, 10]
    rows = [
        [1, 2, 3] + image(g1) + [4, 5] + image(g2) + [6],  # two images of different shapes
        [7] + image(g3) + [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19],  # one larger image, longest row
        [20, 21, 22, 23],  # text only
    ]
    ids, mask = batch(rows, side)
    grid = [g1, g2, g3]
    pos, deltas = get_rope_index(
        ids, np.array(grid), np.array(mask), spatial_merge_size=2, image_token_id=IMG, vision_start_token_id=START
    )
    ref_pos, ref_deltas = transformers_rope_index(ids, grid, mask)
    assert pos.shape == (3, 3, len(ids[0])) and deltas.shape == (3, 1)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)


def test_rope_index_without_mask_and_errors():
    ids = [[5] + image([1, 2, 4]) + image([1, 4, 2]) + [6]]
    pos, deltas = get_rope_index(ids, np.array([[1, 2, 4], [1, 4, 2]]), None, spatial_merge_size=2, image_token_id=IMG)
    ref_pos, ref_deltas = transformers_rope_index(ids, [[1, 2, 4], [1, 4, 2]], None)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    with pytest.raises(ValueError, match="more images"):
        get_rope_index(ids, np.array([[1, 2, 4]]), None, spatial_merge_size=2, image_token_id=IMG)
    with pytest.raises(ValueError, match="more rows"):
        get_rope_index(ids, np.array([[1, 2, 4], [1, 4, 2], [1, 2, 2]]), None, spatial_merge_size=2, image_token_id=IMG)
    with pytest.raises(ValueError, match="vision_start"):
        get_rope_index([[5, IMG, IMG]], np.array([[1, 2, 4]]), None, spatial_merge_size=2, image_token_id=IMG,
                       vision_start_token_id=START)


# ---------------------------------------------------------------------------------------------
# Image processor


def random_images():
    rs = np.random.RandomState(0)
    rgb = lambda h, w: rs.randint(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
    palette = Image.fromarray(rgb(45, 61)).convert("P")
    palette.info["transparency"] = 0
    return [
        Image.fromarray(rgb(37, 53)),  # upscaled to min_pixels
        Image.fromarray(rs.randint(0, 256, (301, 91, 4), dtype=np.uint8), "RGBA"),  # alpha onto white
        Image.fromarray(rs.randint(0, 256, (500, 333), dtype=np.uint8), "L"),  # grayscale, downscaled
        Image.fromarray(rgb(133, 217)),
        palette,  # palette transparency
        rgb(90, 200),  # numpy HWC uint8
    ]


@pytest.mark.parametrize("min_pixels,max_pixels", [(64 * 28 * 28, 256 * 28 * 28), (56 * 56, 28 * 28 * 1280)])
def test_image_processor_matches_transformers(min_pixels, max_pixels):
    images = random_images()
    ours = QwenImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)(images)
    ref = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images, return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_values"].shape == ref["pixel_values"].shape
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
