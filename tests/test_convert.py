"""Whole-model checkpoint import / export (convert.py): end-to-end parity with a PyTorch reference
pipeline, round trips (Python and CLI), one combined mismatch error, released parameter counts.

The tiny checkpoint directory (the ``released`` fixture, built by tests/references/blip3o.py) is
assembled in the released BLIP3-o layout from random-weight references, exactly as the real folder is
laid out (docs/model.md 10.1): transformers' ``Qwen2_5_VLForConditionalGeneration`` saved with
``save_pretrained`` (4.51 key names) and a flat transformers-4.51 config.json, diffusers'
``LuminaNextDiT2DModel`` + caption MLP under ``model.dit.model.`` (tests/references/dit.py), timm's
``Eva`` in the released EVA names with the fused qkv bias [q, 0, v] (tests/references/eva.py),
``model.latent_queries``, a leftover ``model.vae.*`` tensor, the ``dit_config`` / ``gen_vision_config``
size blocks, split into several safetensors shards + index.

The PyTorch reference pipeline follows docs/model.md 3.1 steps 2-5 and 7 with the same modules: prompt +
[IMG] + queries embedded and run causally through the Qwen decoder, final-norm states of the last
n_query positions; Euler loop with classifier-free guidance (null = zeros, batched [uncond, cond],
integer-truncated timesteps, diffusers' FlowMatchEulerDiscreteScheduler). float32; compared at
rtol 1e-5, atol 1e-5 x max|reference|.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from blip3o_jax import checkpoints, conversion, convert, weights
from blip3o_jax.models import eva_mapping
from tests.references.blip3o import DIT, EVA, GEN_START, N_QUERY, read_dir, write_dir
from tests.references.flow import guided_sample


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _flat_arrays(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def model(released):
    return convert.load_torch(released["path"])


# ---------------------------------------------------------------------------------------------
# PyTorch reference pipeline (docs/model.md 3.1 steps 2-5, 7)


def torch_condition(released, ids: np.ndarray) -> np.ndarray:
    lm = released["qwen"].model.language_model
    with torch.no_grad():
        ids = torch.from_numpy(np.concatenate([ids, np.full((len(ids), 1), GEN_START)], 1))
        embeds = torch.cat([lm.embed_tokens(ids), released["queries"].expand(len(ids), -1, -1)], 1)
        hidden = lm(inputs_embeds=embeds).last_hidden_state  # causal, positions arange, after model.norm
    return hidden[:, -N_QUERY:].numpy()


# ---------------------------------------------------------------------------------------------
# End-to-end parity


def test_config_read_from_the_released_fields(model):
    cfg = model.cfg
    assert (cfg.n_query, cfg.gen_start_token_id, cfg.target_encoder) == (N_QUERY, GEN_START, "eva_clip")
    # A loaded model's components carry the resolved attention backend (model.attention's default, auto).
    resolved = lambda c: dataclasses.replace(c, attention="auto")
    assert cfg.head == resolved(DIT) and cfg.eva == resolved(EVA) and cfg.llm.vocab_size == 128
    assert model.backbone.lm_head is not None and cfg.dtype == "float32"


def test_condition_and_sampling_match_the_reference_pipeline(released, model):
    ids = np.random.default_rng(0).integers(4, 96, size=(2, 11))
    z_ref = torch_condition(released, ids)
    z = np.asarray(model.condition(ids))
    _close(z, z_ref)

    noise = np.random.default_rng(1).standard_normal((2, DIT.num_tokens, DIT.in_channels)).astype(np.float32)
    for steps in (4, 30):
        want = guided_sample(released["dit"], released["cap"], DIT, z_ref, noise, steps)
        _close(model.sample_features(z, noise, num_steps=steps), want)


def test_target_features_match_timm(released, model):
    images = np.random.default_rng(2).normal(size=(2, EVA.image_size, EVA.image_size, 3)).astype(np.float32)
    with torch.no_grad():
        (grid,) = released["eva"].forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                        indices=[EVA.layers - 1], norm=False, intermediates_only=True)
        want = F.avg_pool2d(grid, EVA.pool_size, EVA.pool_size).flatten(2).transpose(1, 2).numpy()
    _close(model.target_features(images), want)


def test_nested_transformers5_config_reads_the_same(released):
    flat = released["config"]
    nested = {k: v for k, v in flat.items() if k not in ("hidden_size", "num_hidden_layers", "rope_theta",
                                                         "rope_scaling", "intermediate_size")}
    nested["text_config"] = {k: flat[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                  "vocab_size", "num_attention_heads", "num_key_value_heads")}
    nested["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": flat["rope_theta"],
                                                "mrope_section": flat["rope_scaling"]["mrope_section"]}
    assert conversion.config_from_hf(nested).to_dict() == conversion.config_from_hf(flat).to_dict()


# ---------------------------------------------------------------------------------------------
# Round trips


def test_save_load_round_trip_and_transformers_reads_the_export(released, model, tmp_path):
    out = tmp_path / "exported"
    convert.save_torch(model, out, max_shard_bytes=200 << 10)
    assert os.path.exists(out / "model.safetensors.index.json")
    exported = read_dir(out)
    assert exported.keys() == {k for k in released["tensors"] if not k.startswith("model.vae.")}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, released["tensors"][k], err_msg=k)

    again = convert.load_torch(out)
    assert again.cfg == model.cfg
    a, b = _flat_arrays(model), _flat_arrays(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True, attn_implementation="eager")
    ids = torch.from_numpy(np.random.default_rng(3).integers(4, 96, size=(2, 9)))
    with torch.no_grad():
        want = released["qwen"](input_ids=ids).logits.numpy()
        got = hf.eval()(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    _close(model.lm_logits(ids.numpy()), want)


def test_cli_round_trip_torch_orbax_torch(released, model, tmp_path):
    # Small groups: the parameters are written in several Orbax partial saves.
    convert.main(["--src", str(released["path"]), "--dst", str(tmp_path / "orbax"), "--group-bytes", str(200 << 10)])
    assert checkpoints.is_model_checkpoint(tmp_path / "orbax")
    restored, _ = checkpoints.load_model(tmp_path / "orbax")
    a, b = _flat_arrays(model), _flat_arrays(restored)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    checkpoints.restore_into(model, str(tmp_path / "orbax"))  # training init_from reads the same files

    convert.main(["--src", str(tmp_path / "orbax"), "--dst", str(tmp_path / "torch"), "--to", "torch"])
    exported = read_dir(tmp_path / "torch")
    assert exported.keys() == {k for k in released["tensors"] if not k.startswith("model.vae.")}
    for k, v in exported.items():
        np.testing.assert_array_equal(v, released["tensors"][k], err_msg=k)
    back = json.loads((tmp_path / "torch" / "config.json").read_text())
    assert back["gen_start_token_id"] == GEN_START and back["vision_end_token_id"] == released["config"]["vision_end_token_id"]


def test_missing_target_encoder_and_tied_head(released, model, tmp_path):
    """No gen_vision_tower -> no target encoder; load_into keeps the model's own target encoder. Tied
    embeddings: no lm_head.weight needed (and none in the model)."""
    tensors = {k: v for k, v in released["tensors"].items() if not k.startswith("model.gen_vision_tower.")}
    write_dir(tmp_path / "no_eva", tensors, released["config"])
    bare = convert.load_torch(tmp_path / "no_eva")
    assert bare.target_encoder is None and bare.cfg.target_encoder == "none"
    before = np.asarray(model.target_encoder.pos_embed[...])
    conversion.load_into(model, tmp_path / "no_eva")  # fills everything else in place, leaves the EVA untouched
    np.testing.assert_array_equal(np.asarray(model.target_encoder.pos_embed[...]), before)

    del tensors["lm_head.weight"]
    write_dir(tmp_path / "tied", tensors, released["config"] | {"tie_word_embeddings": True})
    tied = convert.load_torch(tmp_path / "tied")
    assert tied.cfg.llm.tie_word_embeddings and "lm_head" not in nnx.state(tied, nnx.Param)["backbone"]


# ---------------------------------------------------------------------------------------------
# Errors


def test_one_error_names_every_offending_key(released, tmp_path):
    tensors = dict(released["tensors"])
    del tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors[eva_mapping.RELEASED_PREFIX + "blocks.0.norm2.bias"]
    tensors["model.dit.model.pad_token"] = np.zeros((DIT.dim,), np.float32)
    tensors["model.latent_queries"] = np.zeros((1, N_QUERY + 1, 64), np.float32)
    write_dir(tmp_path, tensors, released["config"])
    with pytest.raises(weights.CheckpointMismatchError) as err:
        convert.load_torch(tmp_path)
    e, msg = err.value, str(err.value)
    assert {k for k, _ in e.missing} == {"model.layers.1.mlp.up_proj.weight",
                                         eva_mapping.RELEASED_PREFIX + "blocks.0.norm2.bias"}
    assert [k for k, _ in e.unexpected] == ["model.dit.model.pad_token"]
    assert [k for k, *_ in e.mismatched] == ["model.latent_queries"]
    for k in ("model.layers.1.mlp.up_proj.weight", "blocks.0.norm2.bias", "model.dit.model.pad_token",
              "model.latent_queries", "(1, 9, 64)"):
        assert k in msg


def test_pickle_refused_unless_allowed(released, tmp_path):
    torch.save({"model.latent_queries": released["queries"]}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(released["config"]))
    with pytest.raises(ValueError, match="pickle"):
        convert.load_torch(tmp_path)
    with pytest.raises(weights.CheckpointMismatchError):  # read, then found incomplete
        convert.load_torch(tmp_path, allow_pickle=True)


# ---------------------------------------------------------------------------------------------
# Released sizes, abstractly


def _component_counts(get_config) -> dict[str, int]:
    from blip3o_jax.models import blip3o as model_lib

    mcfg = model_lib.Blip3oConfig.from_config(get_config())
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model_lib.Blip3o(mcfg, rngs=nnx.Rngs(0)))  # no allocation
    state = nnx.state(abstract, nnx.Param)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))  # noqa: E731
    counts = {
        "qwen vision tower": count(state["backbone"]["visual"]),
        "qwen decoder": count(state["backbone"]["model"]),
        "lm_head": count(state["backbone"]["lm_head"]) if "lm_head" in state["backbone"] else 0,
        "latent_queries": count(state["latent_queries"]),
        "DiT head": count(state["gen_head"]),
        "EVA-CLIP target": count(state["target_encoder"]),
    }
    counts["total"] = sum(counts.values())
    return counts


# Qwen2.5-VL-7B / -3B-Instruct (8,292,166,656 / 3,754,622,976) with the vocabulary resized from
# 152064 / 151936 to BLIP3-o's 151668 rows (untied 7B: embedding and head; tied 3B: embedding only).
QWEN_8B = 8_292_166_656 - (152064 - 151668) * 3584 * 2
QWEN_4B = 3_754_622_976 - (151936 - 151668) * 2048


@pytest.mark.parametrize("name,dit,queries,qwen", [("8b", 1_365_010_336, 64 * 3584, QWEN_8B),
                                                   ("4b", 1_362_257_824, 64 * 2048, QWEN_4B)])
def test_released_parameter_counts(name, dit, queries, qwen):
    import importlib

    counts = _component_counts(importlib.import_module(f"configs.blip3o_{name}").get_config)
    print(f"\nBLIP3-o {name.upper()} parameters:")
    for k, v in counts.items():
        print(f"  {k:18s} {v:>15,d}")
    assert counts["DiT head"] == dit and counts["latent_queries"] == queries
    assert counts["qwen vision tower"] + counts["qwen decoder"] + counts["lm_head"] == qwen
    assert 4.3e9 < counts["EVA-CLIP target"] < 4.4e9  # "about 4.35 B" (docs/model.md 10.1)


def test_bfloat16_load(released):
    half = convert.load_torch(released["path"], dtype="bfloat16", with_target_encoder=False)
    assert half.target_encoder is None and half.cfg.param_dtype == "bfloat16"
    dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(half, nnx.Param))}
    assert dtypes == {"bfloat16"}
