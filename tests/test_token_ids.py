"""Token ids outside the embedding table fail loudly (issue 20 item 6; models/qwen2_5_vl.py TokenIdError).

Why the checks exist: PyTorch's ``nn.Embedding`` (the released pipeline) raises on an out-of-range id,
while JAX's gather (``nnx.Embed`` -> ``jnp.take``) reads a NaN row, and that NaN reaches every position
of its row even when the id sits in masked-out padding. ``generate --features-out`` thus wrote all-NaN
features with exit 0 when the config's pad id (the released 151643) lay beyond a small checkpoint's
vocabulary. Now every host-side entry point checks its ids first; the pad id comes from the tokenizer.

The model is the tiny released-layout checkpoint of the ``released`` fixture (vocabulary 128,
transformers Qwen2.5-VL as the reference); in-range calls match transformers at the tolerance of
tests/test_convert.py (rtol 1e-5, atol 1e-5 x max|reference|) and the unchecked jitted computation
bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blip3o_jax import checkpoints, convert, decode, generate, inference
from blip3o_jax.models import blip3o as model_lib
from blip3o_jax.models import qwen2_5_vl
from blip3o_jax.models.qwen2_5_vl import TokenIdError
from tests.references.blip3o import GEN_START, tiny_tokenizer
from tests.references.configs import demo_config
from tests.references.qwen import PAD, VOCAB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURES = ["--steps", "2", "--devices", "1"]


@pytest.fixture(scope="module")
def model(released):
    return convert.load_torch(released["path"])


def _checkpoint(released, path, tokenizer, **config):
    """A copy of the released-layout directory (weights linked) with ``tokenizer`` and config.json changes."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(released["path"]):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.symlink(os.path.join(released["path"], name), os.path.join(path, name))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(released["config"] | config, f)
    tokenizer.save_pretrained(path)
    return str(path)


def _bad_pad_tokenizer():
    """The tiny tokenizer padding with an added token: id 128, one past the model's 128 rows."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    assert tok.pad_token_id == VOCAB
    return tok


def _torch_condition(released, ids: np.ndarray) -> np.ndarray:
    """docs/model.md 3.1 in PyTorch: prompt, [IMG], queries through the transformers decoder, batch 1."""
    lm = released["qwen"].model.language_model
    with torch.no_grad():
        ids = torch.from_numpy(np.concatenate([ids, np.full((len(ids), 1), GEN_START)], 1))
        embeds = torch.cat([lm.embed_tokens(ids), released["queries"].expand(len(ids), -1, -1)], 1)
        hidden = lm(inputs_embeds=embeds).last_hidden_state
    return hidden[:, -released["queries"].shape[1]:].numpy()


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# Why: the unchecked gather


def test_unchecked_gather_reads_nan_where_torch_raises(released, model):
    ids = np.array([[VOCAB, 5, 6, 7]])  # a pad id one past the table, left padding
    mask = np.array([[0, 1, 1, 1]])
    with pytest.raises(IndexError):  # the released pipeline: nn.Embedding refuses
        released["qwen"].model.language_model.embed_tokens(torch.from_numpy(ids))
    # The raw jitted path (what condition ran before the check): the masked pad poisons the whole row.
    z = model_lib._condition(model, jnp.asarray(ids), jnp.asarray(mask))
    assert np.isnan(np.asarray(z)).all()


# ---------------------------------------------------------------------------------------------
# The model's entry points


@pytest.mark.parametrize("bad", [VOCAB, 151643, -1])
def test_lm_logits_and_condition_raise(model, bad):
    ids = np.array([[3, 4, 5, 6], [bad, 4, 5, 6]])
    mask = np.array([[1, 1, 1, 1], [0, 1, 1, 1]])  # the bad id is masked padding: still refused
    with pytest.raises(TokenIdError, match=rf"Blip3o.lm_logits input_ids: token id\(s\) {bad} outside the embedding "
                                           rf"table of {VOCAB} rows .*first at index \(1, 0\)"):
        model.lm_logits(ids, mask)
    with pytest.raises(TokenIdError, match=rf"Blip3o.condition input_ids: token id\(s\) {bad} .* {VOCAB} rows"):
        model.condition(ids, mask)
    with pytest.raises(TokenIdError, match=rf"^input_ids: token id\(s\) {bad} "):  # the backbone's own entry
        model.backbone.lm_logits(ids, mask)


def test_in_range_calls_unchanged(released, model):
    ids = np.random.default_rng(3).integers(4, 96, size=(2, 9))
    with torch.no_grad():
        want = released["qwen"](input_ids=torch.from_numpy(ids)).logits.numpy()
    got = model.lm_logits(ids)
    _close(got, want)
    embeds, mask, positions, _ = model.backbone.multimodal_inputs(ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(qwen2_5_vl._text_logits(model.backbone, embeds,
                                                                                        jnp.asarray(mask), positions)))
    # condition with left padding by the tokenizer's pad id = the unpadded PyTorch reference per row.
    short = ids[1, 3:]
    padded = np.stack([ids[0], np.concatenate([np.full(3, PAD), short])])
    mask = np.stack([np.ones(9, int), (np.arange(9) >= 3).astype(int)])
    z = model.condition(padded, mask)
    _close(z[0], _torch_condition(released, ids[:1])[0])
    _close(z[1], _torch_condition(released, short[None])[0])
    np.testing.assert_array_equal(np.asarray(z), np.asarray(model_lib._condition(model, jnp.asarray(padded),
                                                                                 jnp.asarray(mask))))


def test_decode_generate_checks_prompt_and_pad(model):
    ids = np.array([[3, 4, 5]])
    with pytest.raises(TokenIdError, match=rf"decode.generate pad_token_id: token id\(s\) 151643 .* {VOCAB} rows"):
        decode.generate(model.backbone, ids, max_new_tokens=2, pad_token_id=151643)
    with pytest.raises(TokenIdError, match=r"decode.generate input_ids: token id\(s\) 500 "):
        decode.generate(model.backbone, np.array([[3, 500, 5]]), max_new_tokens=2, pad_token_id=PAD)


# ---------------------------------------------------------------------------------------------
# The config's own ids


def test_config_ids_checked_when_built_or_loaded(released, tmp_path):
    # gen_start_token_id is embedded by condition itself: a model without a row for it cannot load.
    path = _checkpoint(released, tmp_path / "gen_start", tiny_tokenizer(), gen_start_token_id=151665)
    with pytest.raises(TokenIdError, match=r"model.gen_start_token_id = 151665 outside the embedding table of "
                                           rf"model.llm.vocab_size = {VOCAB} rows"):
        checkpoints.load_model(path)
    # A model with a vision tower needs its image ids.
    path = _checkpoint(released, tmp_path / "image", tiny_tokenizer(), image_token_id=151655)
    with pytest.raises(TokenIdError, match=r"model.image_pad_token_id = 151655"):
        checkpoints.load_model(path)
    # The released pad default is fed only by training samples / a tokenizer without a pad token: loadable.
    _, cfg = checkpoints.load_model(_checkpoint(released, tmp_path / "pad", tiny_tokenizer(), pad_token_id=151643))
    assert cfg.model.pad_token_id == 151643
    # ... but a fresh model for training (whose batches carry pad and query ids) is refused.
    with pytest.raises(TokenIdError, match=r"model.pad_token_id = 151643"):
        model_lib.build_model(cfg, inference.inference_mesh(1))
    model_lib.check_config_token_ids(demo_config(), training=True)  # the demo's tiny ids fit its 1024 rows


# ---------------------------------------------------------------------------------------------
# The pipeline: generate (CLI) and understand


def test_generate_cli_refuses_out_of_range_pad(released, tmp_path):
    path = _checkpoint(released, tmp_path / "ckpt", _bad_pad_tokenizer())
    out = tmp_path / "f.npy"
    with pytest.raises(TokenIdError, match=rf"the padding id \(tokenizer.pad_token_id\): token id\(s\) {VOCAB} "
                                           rf"outside the embedding table of {VOCAB} rows"):
        generate.main(["--checkpoint", path, "--prompt", "a red circle", "--features-out", str(out), *FEATURES])
    assert not out.exists()


@pytest.mark.slow
def test_generate_command_exits_nonzero(released, tmp_path):
    """The command itself (a fresh process, about 30 s): non-zero exit status, the id named, nothing written."""
    path = _checkpoint(released, tmp_path / "ckpt", _bad_pad_tokenizer())
    out = tmp_path / "f.npy"
    run = subprocess.run([sys.executable, "-m", "blip3o_jax.generate", "--checkpoint", path, "--prompt", "a red circle",
                          "--features-out", str(out), *FEATURES], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode != 0 and not out.exists()
    assert f"TokenIdError: the padding id (tokenizer.pad_token_id): token id(s) {VOCAB} outside" in run.stderr


def test_pad_id_comes_from_the_tokenizer(released, tmp_path):
    # The case: config.json keeps the released pad 151643, the tokenizer pads with its own id.
    ok = _checkpoint(released, tmp_path / "ok", tiny_tokenizer(), pad_token_id=151643)
    pipe = inference.Pipeline.from_checkpoint(ok, mesh=inference.inference_mesh(1))
    assert pipe.pad_token_id == PAD
    prompts = ["a red circle", "a small blue square at the top left"]  # different lengths: padding used
    feats = pipe.generate_features(prompts, seed=1, num_steps=2)
    assert np.isfinite(feats).all()
    # Identical to the same checkpoint whose config pad is in range (padding is masked out).
    same = _checkpoint(released, tmp_path / "same", tiny_tokenizer())
    ref = inference.Pipeline.from_checkpoint(same, mesh=inference.inference_mesh(1))
    np.testing.assert_array_equal(ref.generate_features(prompts, seed=1, num_steps=2), feats)

    # Without a pad token the config's is used, and checked.
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    none = _checkpoint(released, tmp_path / "none", tok, pad_token_id=151643)
    pipe = inference.Pipeline.from_checkpoint(none, mesh=inference.inference_mesh(1))
    with pytest.raises(TokenIdError, match=r"the padding id \(config model.pad_token_id; the tokenizer has no pad "
                                           rf"token\): token id\(s\) 151643 outside the embedding table of {VOCAB}"):
        pipe.generate_features(prompts, num_steps=2)


def test_understand_refuses_out_of_range_ids(released, tmp_path):
    image = np.random.RandomState(0).randint(0, 256, (60, 90, 3)).astype(np.uint8)
    pipe = inference.Pipeline.from_checkpoint(_checkpoint(released, tmp_path / "pad", _bad_pad_tokenizer()),
                                              mesh=inference.inference_mesh(1))
    with pytest.raises(TokenIdError, match=rf"the padding id \(tokenizer.pad_token_id\): token id\(s\) {VOCAB} "):
        pipe.understand(image, "What color is the shape ?", max_new_tokens=2)
    # A tokenizer with a word the model has no row for (a tokenizer of another, larger vocabulary).
    tok = tiny_tokenizer()
    tok.add_tokens(["purple"])
    pipe = inference.Pipeline.from_checkpoint(_checkpoint(released, tmp_path / "word", tok),
                                              mesh=inference.inference_mesh(1))
    with pytest.raises(TokenIdError, match=rf"Pipeline.understand: the tokenizer's ids of the prompt: token id\(s\) "
                                           rf"{VOCAB} outside"):
        pipe.understand(image, "What color is the purple shape ?", max_new_tokens=2)
    with pytest.raises(TokenIdError, match=rf"Pipeline.encode: the tokenizer's ids of the prompts: token id\(s\) "
                                           rf"{VOCAB} outside"):
        pipe.generate_features(["a purple circle"], num_steps=2)


# ---------------------------------------------------------------------------------------------
# Training batches (prepare_batch runs on every host batch of train.py)


def test_training_batches_checked():
    cfg = demo_config()
    vocab = cfg.model.llm.vocab_size
    ids = np.full((2, 80), cfg.model.pad_token_id, np.int32)
    ids[:, :5] = [1, 2, 3, 4, cfg.model.gen_start_token_id]
    batch = dict(input_ids=ids, attention_mask=(ids != cfg.model.pad_token_id).astype(np.int32),
                 labels=np.full((2, 80), -100, np.int32), query_start=np.array([5, 5], np.int32))
    host, grid = model_lib.prepare_batch(batch, cfg)  # in range: passes through unchanged
    assert grid is None and all(np.array_equal(host[k], batch[k]) for k in batch)

    bad = dict(batch, input_ids=np.where(ids == 3, vocab + 7, ids))
    with pytest.raises(TokenIdError, match=rf"the training batch of step 12: input_ids: token id\(s\) {vocab + 7} "
                                           rf"outside the embedding table of {vocab} rows"):
        model_lib.prepare_batch(bad, cfg, "the training batch of step 12")
    # An id that a config key put there is named (data/samples.py pads with model.pad_token_id).
    cfg.model.pad_token_id = 5000
    with pytest.raises(TokenIdError, match=r"input_ids \(the id of model.pad_token_id\): token id\(s\) 5000 "):
        model_lib.prepare_batch(dict(batch, input_ids=np.where(ids == 1000, 5000, ids)), cfg)
    labels = batch["labels"].copy()
    labels[1, 3] = vocab
    with pytest.raises(TokenIdError, match=rf"training batch: labels: token id\(s\) {vocab} .*first at index \(1, 3\)"):
        model_lib.prepare_batch(dict(batch, labels=labels), cfg)
    late = 80 - cfg.model.n_query + 1
    with pytest.raises(ValueError, match=rf"query_start \[{late}\] puts the .* query slots outside rows of 80 tokens"):
        model_lib.prepare_batch(dict(batch, query_start=np.array([5, late], np.int32)), cfg)
