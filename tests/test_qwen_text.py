"""Qwen2.5-VL backbone (text decoder, M-RoPE, KV-cache decoding, converter, chat template) against
transformers' ``Qwen2_5_VLForConditionalGeneration`` built tiny with random weights, saved with
``save_pretrained`` (released 4.51 key names) or re-keyed to transformers-5 names, and loaded through
qwen_mapping (the real streaming converter). float32 everywhere; logits compared at rtol 1e-5 with
atol = 1e-5 x max|logit|.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.torch import save_file

from blip3o_jax import decode, sharding, weights
from blip3o_jax.data import chat
from blip3o_jax.models import qwen_mapping
from blip3o_jax.models.qwen2_5_vl import Qwen2_5_VL, QwenTextConfig
from blip3o_jax.models.qwen_vision import QwenVisionConfig
from tests.references.qwen import EOS, IMAGE, PAD, V_END, V_START, VOCAB, flat_config, tiny_hf

PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """GQA (4 query / 2 kv heads), 2 layers, untied head; saved with save_pretrained (4.51 names,
    nested transformers-5 config.json) as sharded safetensors + index."""
    ref = tiny_hf(0, heads=4, kv_heads=2, layers=2, tied=False)
    path = str(tmp_path_factory.mktemp("qwen_untied"))
    ref.save_pretrained(path, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    return ref, path, qwen_mapping.from_pretrained(path)


@pytest.fixture(scope="module")
def tied_v5(tmp_path_factory):
    """MHA (4/4 heads), 1 layer, tied head; transformers-5 key names, no lm_head.weight, flat
    transformers-4.51 config.json."""
    ref = tiny_hf(1, heads=4, kv_heads=4, layers=1, tied=True)
    path = str(tmp_path_factory.mktemp("qwen_tied_v5"))
    state = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.") for k in state)  # in-memory names are the v5 ones
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(flat_config(ref.config.to_dict()), f)
    return ref, path, qwen_mapping.from_pretrained(path)


def text_batch(seed, length=12, pad=0, left=False):
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, 96, size=(2, length))
    mask = np.ones_like(ids)
    if pad:
        if left:
            mask[1, :pad] = 0
        else:
            mask[1, length - pad:] = 0
        ids[mask == 0] = PAD
    return ids, mask


def torch_logits(ref, ids, mask, position_ids=None, **kw):
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=None if position_ids is None else torch.tensor(position_ids), **kw)
    return out.logits.numpy()


def assert_close_on(mask, got, want):
    got, want = np.asarray(got)[mask.astype(bool)], want[mask.astype(bool)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# config.json and key naming


def test_configs_from_hf_both_spellings(untied):
    ref, path, _ = untied
    with open(os.path.join(path, "config.json")) as f:
        nested = json.load(f)
    text, vision = qwen_mapping.configs_from_hf(nested)
    assert text == QwenTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                                  mrope_section=(2, 3, 3), tie_word_embeddings=False)
    assert vision == QwenVisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, window_size=56,
                                      fullatt_block_indexes=(1,), out_hidden_size=64)
    assert qwen_mapping.configs_from_hf(flat_config(nested)) == (text, vision)
    tokens = qwen_mapping.token_ids_from_hf(nested)
    assert (tokens["image_token_id"], tokens["vision_start_token_id"], tokens["eos_token_ids"]) == (IMAGE, V_START, (EOS,))


def test_canonical_key():
    assert qwen_mapping.canonical_key("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert qwen_mapping.canonical_key("model.visual.merger.mlp.0.bias") == "visual.merger.mlp.0.bias"
    for key in ("model.layers.0.input_layernorm.weight", "visual.blocks.0.norm1.weight", "lm_head.weight",
                "model.latent_queries", "model.dit.model.x"):
        assert qwen_mapping.canonical_key(key) == key


# ---------------------------------------------------------------------------------------------
# Logits and hidden states


def test_logits_right_padding(untied):
    ref, _, model = untied
    ids, mask = text_batch(0, pad=4)
    assert_close_on(mask, model.lm_logits(ids, mask), torch_logits(ref, ids, mask))


def test_logits_left_padding(untied):
    # transformers' forward() numbers text positions 0..L-1 regardless of padding; generate() and
    # 4.51's get_rope_index count real tokens. lm_logits follows the latter, so pass those positions.
    ref, _, model = untied
    ids, mask = text_batch(1, pad=5, left=True)
    positions = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
    assert_close_on(mask, model.lm_logits(ids, mask), torch_logits(ref, ids, mask, positions))


def test_hidden_states_are_post_norm(untied):
    ref, _, model = untied
    ids, mask = text_batch(2, pad=3)
    with torch.no_grad():
        want = ref.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    got = model.hidden_states(model.embed(ids), mask)
    assert_close_on(mask, got, want)


def test_tied_transformers5_names_flat_config(tied_v5):
    ref, _, model = tied_v5
    assert model.lm_head is None
    ids, mask = text_batch(3, pad=2)
    assert_close_on(mask, model.lm_logits(ids, mask), torch_logits(ref, ids, mask))


def image_batch(rng):
    """Row 0: two images of different sizes; row 1: one image, right padded. Returns ids, mask,
    pixel_values (processor layout) and grid_thw."""
    grids = np.array([[1, 8, 8], [1, 4, 12], [1, 4, 4]])
    n_tok = [chat.num_image_tokens(g) for g in grids]  # 16, 12, 4

    def image(n):
        return [V_START] + [IMAGE] * n + [V_END]

    row0 = [5, 6] + image(n_tok[0]) + [7, 8, 9] + image(n_tok[1]) + [10, 11]
    row1 = [12] + image(n_tok[2]) + [13, 14, 15, 16]
    length = len(row0)
    ids = np.full((2, length), PAD)
    mask = np.zeros((2, length), np.int64)
    ids[0], mask[0] = row0, 1
    ids[1, : len(row1)], mask[1, : len(row1)] = row1, 1
    pixels = rng.randn(int(grids.prod(1).sum()), PATCH_DIM).astype(np.float32)
    return ids, mask, pixels, grids


def test_logits_with_images(untied):
    ref, _, model = untied
    ids, mask, pixels, grids = image_batch(np.random.RandomState(4))
    want = torch_logits(ref, ids, mask, pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                        mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)))
    got = model.lm_logits(ids, mask, pixel_values=pixels, image_grid_thw=grids)
    assert_close_on(mask, got, want)


def test_gradient_through_frozen_decoder_with_remat(untied):
    # BLIP3-o trains the latent queries through the frozen backbone: its state enters jax.grad as a
    # non-differentiated constant, and remat must not change the gradient.
    _, _, loaded = untied
    state = nnx.state(loaded)
    ids = np.arange(10, 20).reshape(2, 5)

    def query_grad(remat):
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2_5_VL(
            loaded.text_cfg, loaded.vision_cfg, image_token_id=IMAGE, vision_start_token_id=V_START,
            remat=remat, rngs=nnx.Rngs(0))))

        @jax.jit
        def grad(state, queries):
            model = nnx.merge(graphdef, state)

            def loss(q):
                h = model.hidden_states(jnp.concatenate([model.embed(ids), q], axis=1))
                return jnp.sum(h[:, -3:] ** 2)

            return jax.grad(loss)(queries)

        return np.asarray(grad(state, jnp.ones((2, 3, 64))))

    full, none = query_grad("full"), query_grad("none")
    assert np.abs(none).max() > 0
    np.testing.assert_allclose(full, none, rtol=1e-5, atol=1e-5 * np.abs(none).max())


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_generation_matches_transformers(untied):
    ref, _, model = untied
    ids, mask = text_batch(5, length=9, pad=3, left=True)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                           do_sample=False, eos_token_id=EOS, pad_token_id=PAD).numpy()[:, ids.shape[1]:]
    got = decode.generate(model, ids, mask, max_new_tokens=20, eos_token_ids=(EOS,), pad_token_id=PAD)
    np.testing.assert_array_equal(got[:, : out.shape[1]], out)
    # A prompt of another length in the same bucket reuses the compiled loop.
    before = decode._generate._cache_size()
    decode.generate(model, ids[:, 1:], mask[:, 1:], max_new_tokens=20, eos_token_ids=(EOS,), pad_token_id=PAD)
    assert decode._generate._cache_size() == before


def test_greedy_generation_with_images(untied):
    ref, _, model = untied
    ids, mask, pixels, grids = image_batch(np.random.RandomState(6))
    # transformers' generate wants left padding.
    ids_left, mask_left = decode.left_align(ids, mask, ids.shape[1], PAD)
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor(ids_left), attention_mask=torch.tensor(mask_left),
            pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
            mm_token_type_ids=torch.tensor((ids_left == IMAGE).astype(np.int64)),
            max_new_tokens=20, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        ).numpy()[:, ids.shape[1]:]
    got = decode.generate(model, ids, mask, pixel_values=pixels, image_grid_thw=grids, max_new_tokens=20,
                          eos_token_ids=(EOS,), pad_token_id=PAD)
    np.testing.assert_array_equal(got[:, : out.shape[1]], out)


def test_sampling_is_reproducible(untied):
    # Same batch, bucket and length as the greedy test, so its compiled greedy loop is reused.
    _, _, model = untied
    ids, mask = text_batch(5, length=9, pad=3, left=True)
    kw = dict(max_new_tokens=20, eos_token_ids=(EOS,), pad_token_id=PAD)
    a = decode.generate(model, ids, mask, temperature=1.0, top_p=0.9, seed=3, **kw)
    np.testing.assert_array_equal(a, decode.generate(model, ids, mask, temperature=1.0, top_p=0.9, seed=3, **kw))
    assert not np.array_equal(a, decode.generate(model, ids, mask, temperature=1.0, top_p=0.9, seed=4, **kw))
    # A nucleus smaller than any single token's mass leaves only the argmax.
    np.testing.assert_array_equal(
        decode.generate(model, ids, mask, temperature=0.7, top_p=1e-6, seed=5, **kw),
        decode.generate(model, ids, mask, **kw),
    )


def test_top_p_filter():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(decode.top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])


# ---------------------------------------------------------------------------------------------
# Converter errors and sharding


def test_converter_lists_every_offending_key(untied, tmp_path):
    _, path, _ = untied
    ckpt = weights.TorchCheckpoint(path)
    state = {k: torch.from_numpy(ckpt.get(k)) for k in ckpt.keys()}
    del state["model.layers.1.mlp.up_proj.weight"]
    del state["lm_head.weight"]  # required: this model is untied
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    state["visual.merger.mlp.2.bias"] = torch.zeros(65)
    save_file(state, os.path.join(tmp_path, "model.safetensors"))
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    with pytest.raises(weights.CheckpointMismatchError) as err:
        qwen_mapping.from_pretrained(str(tmp_path))
    message = str(err.value)
    for key in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.layers.0.self_attn.o_proj.bias",
                "visual.merger.mlp.2.bias"):
        assert key in message
    assert (err.value.missing, len(err.value.unexpected), len(err.value.mismatched)) == (
        [("model.layers.1.mlp.up_proj.weight", (96, 64)), ("lm_head.weight", (VOCAB, 64))], 1, 1)


def test_sharded_forward_matches(untied):
    _, path, model = untied
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = qwen_mapping.from_pretrained(path, mesh, "fsdp", with_vision=False)
    specs = {
        "model/embed_tokens/embedding": P("tensor", "fsdp"),
        "model/layers/self_attn/q_proj/kernel": P(None, "fsdp", "tensor"),
        "model/layers/self_attn/k_proj/bias": P(None, "tensor"),
        "model/layers/self_attn/o_proj/kernel": P(None, "tensor", "fsdp"),
        "model/layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
        "model/layers/input_layernorm/scale": P(None, None),
        "lm_head/kernel": P("fsdp", "tensor"),
    }
    flat = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))}
    for path_, spec in specs.items():
        assert flat[path_][...].sharding.spec == spec, path_
    ids, mask = text_batch(8, pad=2)
    with jax.set_mesh(mesh):
        got = sharded.lm_logits(ids, mask)
    assert got.shape == (2, 12, VOCAB)
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.lm_logits(ids, mask)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Chat template


def test_chat_templates():
    sys = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    user = "<|im_start|>user\nPlease generate image based on the following caption: a red cube<|im_end|>\n"
    assert chat.t2i_prompt("a red cube") == sys + user + "<|im_start|>assistant\n"
    assert chat.t2i_training_prompt("a red cube") == sys + user + "<|im_start|>assistant\n<|im_end|>\n"
    assert chat.understanding_prompt("What is it?", 3) == (
        sys + "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|image_pad|><|vision_end|>"
        "What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.understanding_prompt("Q", [1, 2]).count("<|vision_start|>") == 2
    assert chat.num_image_tokens((1, 32, 32)) == 256  # a 448x448 image (docs/model.md 3.3a)
