"""Inference entry points (inference.py, generate.py, understand.py, eval.py; docs/model.md 3.1-3.3, 7, 9).

The checkpoint is the tiny released-layout directory of the ``released`` fixture (tests/conftest.py:
transformers Qwen2.5-VL + diffusers Lumina DiT + timm EVA, random weights) plus what a real release
folder also holds: tokenizer files (a word-level tokenizer whose special tokens sit on the tiny model's
ids) and a ``diffusion-decoder/`` folder written by diffusers' ``save_pretrained`` (tiny SDXL-layout
UNet2DConditionModel, AutoencoderKL, EulerDiscreteScheduler). ``python -m blip3o_jax.convert`` turns it
into an Orbax checkpoint (tokenizer copied, decoder converted); the CLIs run in-process on both forms.

Parity: ``understand`` must give exactly transformers' greedy ``generate`` tokens; image-conditioned
``condition`` (docs/model.md 3.3a: ViT features at the image pads, 1-D positions) is compared with a PyTorch
pipeline built from the same transformers modules at rtol 1e-5, atol 1e-5 x max|reference| (float32).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_jax import checkpoints as checkpoints_lib
from blip3o_jax import convert, eval as eval_lib, generate, inference, understand
from blip3o_jax.models import flow
from blip3o_jax.decoder import scheduler as sched
from tests.references.blip3o import GEN_START, N_QUERY, tiny_tokenizer
from tests.references.decoder import EULER, PIPELINE_UNET, PIPELINE_VAE, perturb
from tests.references.qwen import EOS, IMAGE, PAD

STEPS = ["--steps", "2", "--decoder-steps", "2", "--devices", "1"]
IMAGE_SIDE = 16  # UNet latent 8 x VAE downscale 2


@pytest.fixture(scope="module")
def checkpoints(released, tmp_path_factory):
    """(torch directory with tokenizer + diffusion-decoder, its Orbax conversion, a decoder-less copy)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    src = released["path"]
    tiny_tokenizer().save_pretrained(src)
    torch.manual_seed(0)
    dec = src / checkpoints_lib.DECODER_DIR
    perturb(UNet2DConditionModel(addition_embed_type="text_time", **PIPELINE_UNET), 1).save_pretrained(dec / "unet")
    perturb(AutoencoderKL(**PIPELINE_VAE), 2).save_pretrained(dec / "vae")
    EulerDiscreteScheduler(**EULER).save_pretrained(dec / "scheduler")
    dst = tmp_path_factory.mktemp("orbax")
    convert.main(["--src", str(src), "--dst", str(dst)])
    bare = tmp_path_factory.mktemp("no_decoder")
    for name in os.listdir(dst):
        if name != checkpoints_lib.DECODER_DIR:
            os.symlink(dst / name, bare / name)
    return src, dst, bare


@pytest.fixture(scope="module")
def pipe(checkpoints):
    return inference.Pipeline.from_checkpoint(checkpoints[1], mesh=inference.inference_mesh(1))


def test_convert_writes_tokenizer_and_decoder(checkpoints, pipe):
    _, dst, _ = checkpoints
    assert os.path.exists(dst / "tokenizer.json")
    assert os.path.exists(dst / checkpoints_lib.DECODER_DIR / "config.json")
    assert pipe.decoder.vae is not None and pipe.decoder.default_size == IMAGE_SIDE
    assert pipe.decoder.scheduler.timestep_spacing == "leading"


def test_generate_cli_writes_pngs_and_features(checkpoints, pipe, tmp_path):
    _, dst, _ = checkpoints
    argv = ["--checkpoint", str(dst), "--prompt", "a red circle", "--prompt", "a small blue square at the top left",
            "--seed", "3", "--out", str(tmp_path / "a.png"), "--features-out", str(tmp_path / "f.npy"), *STEPS]
    paths = generate.main(argv)
    assert paths == [str(tmp_path / "a_000.png"), str(tmp_path / "a_001.png")]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert all(im.shape == (IMAGE_SIDE, IMAGE_SIDE, 3) and im.dtype == np.uint8 for im in images)
    feats = np.load(tmp_path / "f.npy")
    assert feats.shape == (2, 16, 32) and np.isfinite(feats).all()

    # Reproducible: the same seed gives the same features and pixels; per-image noise streams make the
    # result independent of batching; another seed differs.
    again = pipe.generate_features(["a red circle", "a small blue square at the top left"], seed=3, num_steps=2,
                                   batch_size=1)
    np.testing.assert_allclose(again, feats, rtol=1e-5, atol=1e-5 * np.abs(feats).max())
    pixels = pipe.decode(feats, seed=3, num_steps=2, negative_steps=2)
    np.testing.assert_array_equal(pixels, np.stack(images))
    other = pipe.generate_features(["a red circle"], seed=4, num_steps=2)
    assert np.abs(other[0] - feats[0]).max() > 1e-2
    # Other prompts of the same batch size and length bucket reuse every compiled loop.
    compiled = flow._sample._cache_size(), sched._denoise._cache_size()
    new = pipe.generate_features(["a green triangle", "a big square"], seed=5, num_steps=2)
    pipe.decode(new, seed=5, num_steps=2, negative_steps=2)
    assert (flow._sample._cache_size(), sched._denoise._cache_size()) == compiled


def test_torch_directory_on_the_fly_matches_orbax(checkpoints, pipe):
    src, _, _ = checkpoints
    torch_pipe = inference.Pipeline.from_checkpoint(src, mesh=inference.inference_mesh(1), load_decoder_weights=False)
    a = torch_pipe.generate_features(["a red circle"], seed=1, num_steps=2)
    b = pipe.generate_features(["a red circle"], seed=1, num_steps=2)
    np.testing.assert_array_equal(a, b)
    # The decoder's negative = the generator on the raw empty string, computed once.
    neg = pipe.negative_features(num_steps=2)
    assert neg.shape == (1, 16, 32) and pipe.negative_features(num_steps=2) is neg


def test_missing_decoder_features_only(checkpoints, tmp_path):
    _, _, bare = checkpoints
    with pytest.raises(inference.CheckpointError, match="--features-out"):
        generate.main(["--checkpoint", str(bare), "--prompt", "a red circle", "--out", str(tmp_path / "x.png"), *STEPS])
    generate.main(["--checkpoint", str(bare), "--prompt", "a red circle", "--features-out", str(tmp_path / "f.npy"),
                   *STEPS])
    assert np.load(tmp_path / "f.npy").shape == (1, 16, 32)


def _image(seed, h=60, w=90):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def test_understand_matches_transformers_generate(checkpoints, pipe, released, tmp_path):
    _, dst, _ = checkpoints
    image, question = _image(0), "What color is the shape ?"
    Image.fromarray(image).save(tmp_path / "q.png")
    answer = understand.main(["--checkpoint", str(dst), "--image", str(tmp_path / "q.png"), "--question", question,
                              "--max-new-tokens", "12", "--devices", "1"])

    patches, grid = pipe.processor.preprocess_one(image)
    prompt = inference.chat.understanding_prompt(question, inference.chat.num_image_tokens(grid))
    ids = torch.tensor([pipe.tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = released["qwen"].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(patches),
            image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(ids == IMAGE).long(), max_new_tokens=12,
            do_sample=False, eos_token_id=[EOS, PAD], pad_token_id=PAD,
        )[0, ids.shape[1]:].tolist()
    want = out[: next((i for i, t in enumerate(out) if t in (EOS, PAD)), len(out))]
    assert len(want) > 0
    assert pipe.understand_tokens(image, question, max_new_tokens=12) == want
    assert answer == pipe.tokenizer.decode(want, skip_special_tokens=True).strip()


def test_image_conditioned_condition_matches_torch(released, pipe):
    pipe.edit_image_size = 112  # 8 x 8 patches -> 16 image tokens (448 -> 256 in the released model)
    text, pixels, grid = pipe.image_prompt(inference.EDIT_PROMPT, _image(1, 80, 50))
    assert tuple(grid[0]) == (1, 8, 8)
    ids = np.asarray([pipe.tokenizer.encode(text, add_special_tokens=False)])
    assert (ids == IMAGE).sum() == 16
    z = pipe.model.condition(ids, None, pixels, grid)

    qwen, lm = released["qwen"], released["qwen"].model.language_model
    with torch.no_grad():
        feats = torch.cat(qwen.model.get_image_features(torch.from_numpy(pixels), torch.tensor(grid)).pooler_output)
        t_ids = torch.from_numpy(np.concatenate([ids, [[GEN_START]]], 1))
        embeds = lm.embed_tokens(t_ids)
        embeds = embeds.masked_scatter((t_ids == IMAGE)[..., None].expand_as(embeds), feats)
        embeds = torch.cat([embeds, released["queries"]], 1)
        want = lm(inputs_embeds=embeds).last_hidden_state[:, -N_QUERY:].numpy()  # 1-D positions arange
    np.testing.assert_allclose(np.asarray(z), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_edit_and_autoencode_paths(checkpoints, pipe, tmp_path):
    _, dst, _ = checkpoints
    Image.fromarray(_image(2)).save(tmp_path / "in.png")
    generate.main(["--checkpoint", str(dst), "--image", str(tmp_path / "in.png"), "--edit-image-size", "112",
                   "--features-out", str(tmp_path / "e.npy"), *STEPS])
    assert np.load(tmp_path / "e.npy").shape == (1, 16, 32)
    # Autoencoding (3.3b): two images -> target encoder -> decoder (the shapes compiled above).
    rec = pipe.reconstruct([_image(3), _image(4, 40, 40)], seed=0, decoder_steps=2)
    assert rec.shape == (2, IMAGE_SIDE, IMAGE_SIDE, 3) and rec.dtype == np.uint8


def test_eval_geneval_layout_and_vqa(checkpoints, pipe, tmp_path):
    _, dst, _ = checkpoints
    prompts = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
               {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}],
                "prompt": "a photo of a red square"}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    out = tmp_path / "geneval"
    eval_lib.main(["geneval", "--checkpoint", str(dst), "--prompts", str(tmp_path / "meta.jsonl"), "--out", str(out),
                   "--n-samples", "2", *STEPS])
    for i, meta in enumerate(prompts):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == meta
        assert sorted(os.listdir(folder / "samples")) == ["0000.png", "0001.png"]
        assert np.asarray(Image.open(folder / "samples" / "0001.png")).shape == (IMAGE_SIDE, IMAGE_SIDE, 3)

    Image.fromarray(_image(5)).save(tmp_path / "v0.png")
    Image.fromarray(_image(6)).save(tmp_path / "v1.png")
    right = pipe.understand(_image(5), "What color is the shape ?", max_new_tokens=16)
    rows = [{"image": "v0.png", "question": "What color is the shape ?", "answer": right.upper() + "."},
            {"image": str(tmp_path / "v1.png"), "question": "What color is the shape ?", "answer": "no such answer"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The pipe's processor limits, no JPEG round trip (the official defaults: test_eval_vqa_official_defaults).
    result = eval_lib.main(["vqa", "--checkpoint", str(dst), "--data", str(tmp_path / "qa.jsonl"), "--devices", "1",
                            "--min-pixels", "3136", "--max-pixels", "12845056", "--jpeg-quality", "0"])
    assert result["n"] == 2 and result["accuracy"] == 0.5


def test_inference_form_training_sequence_gives_the_inference_condition(pipe):
    """data.generation_prompt = "inference": the training-form query states (queries written into the
    sample's slots) equal Pipeline/model.condition on the same caption; the reference form does not."""
    import jax

    from blip3o_jax.data import chat
    from blip3o_jax.data import samples

    ids = samples.SpecialIds.from_config(pipe.cfg.model)
    captions = ["a red circle left", "a big blue square at the top"]
    prompt_ids, prompt_mask = pipe.encode([chat.t2i_prompt(c) for c in captions])
    with jax.set_mesh(pipe.mesh):
        reference = np.asarray(pipe.model.condition(prompt_ids, prompt_mask))

        def states(prompt):
            rows = [samples.generation_tokens(pipe.tokenizer, c, max_length=64, n_query=N_QUERY, ids=ids, prompt=prompt)
                    for c in captions]
            b = {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "query_start")}
            return np.asarray(pipe.model.query_states(b["input_ids"], b["attention_mask"], b["query_start"]))

        inference_form, training_form = states("inference"), states("training")
    np.testing.assert_allclose(inference_form, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())
    assert np.abs(training_form - reference).max() > 1e-2 * np.abs(reference).max()
    with pytest.raises(ValueError, match="generation prompt 'chat'"):
        samples.generation_tokens(pipe.tokenizer, "x", max_length=64, n_query=N_QUERY, ids=ids, prompt="chat")


# ---------------------------------------------------------------------------------------------
# Fidelity to the released pipeline (issue 20: negative " ", autoencode resizes, eval defaults,
# generation_config.json, the DiT scheduler config)


def _space_tokenizer():
    """The tiny tokenizer with one spare word turned into the token " " (the released Qwen tokenizer
    encodes " " as [220]; the word-level one drops whitespace and would give no id at all)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer()
    vocab = base.get_vocab()
    vocab[" "] = vocab.pop("w75")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base.added_tokens_encoder])
    tok.add_tokens([AddedToken(" ", normalized=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>"), vocab[" "]


def _torch_condition(released, ids):
    """docs/model.md 3.1 steps 2-4 with transformers' modules: embed(ids + [IMG]) ++ queries -> the last
    n_query final-norm states (batch 1, no padding, 1-D positions)."""
    lm = released["qwen"].model.language_model
    with torch.no_grad():
        embeds = lm.embed_tokens(torch.tensor([list(ids) + [GEN_START]]))
        embeds = torch.cat([embeds, released["queries"]], 1)
        return lm(inputs_embeds=embeds).last_hidden_state[:, -N_QUERY:].numpy()


def test_space_prompt_negative_matches_torch(released, pipe):
    """The default negative = the released pipeline's generate_image(text=[" "]): ids of " ", [IMG], the
    queries, no template; then the guided DiT loop (diffusers modules, the same noise)."""
    import jax

    from tests.references.blip3o import DIT
    from tests.references.flow import guided_sample

    assert pipe.negative == "space_prompt" == inference.DEFAULT_NEGATIVE
    tokenizer, space_id = _space_tokenizer()
    original, pipe.tokenizer = pipe.tokenizer, tokenizer
    pipe._negative_cache.clear()
    try:
        assert tokenizer.encode(" ", add_special_tokens=False) == [space_id]
        z = np.asarray(pipe.negative_condition("space_prompt"))
        want = _torch_condition(released, [space_id])
        np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        empty = np.asarray(pipe.negative_condition("empty_prompt"))
        want_empty = _torch_condition(released, [])
        np.testing.assert_allclose(empty, want_empty, rtol=1e-5, atol=1e-5 * np.abs(want_empty).max())
        assert np.abs(empty - z).max() > 1e-2 * np.abs(z).max()

        neg = np.asarray(pipe.negative_features(num_steps=2))
        n, c = pipe.model.gen_head.target_shape
        # The pipeline's negative noise stream (seed 0, stream 2, index 0): an input, drawn the same way.
        noise = np.array(jax.random.normal(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 2), 0),
                                             (1, n, c), np.float32))
        ref = guided_sample(released["dit"], released["cap"], DIT, want, noise, num_steps=2)
        np.testing.assert_allclose(neg, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    finally:
        pipe.tokenizer = original
        pipe._negative_cache.clear()


@pytest.fixture(scope="module")
def extras(checkpoints, tmp_path_factory):
    """The Orbax checkpoint plus a pipeline.json (demo-style zero_image negative), a transformers
    generation_config.json (repetition penalty, eos ids) and a DiT scheduler config (shift 3) at its root."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, dst, _ = checkpoints
    path = tmp_path_factory.mktemp("extras")
    for name in set(os.listdir(dst)) - {"pipeline.json", "generation_config.json", "scheduler"}:
        os.symlink(dst / name, path / name)  # (never write through a link into the shared checkpoint)
    (path / "pipeline.json").write_text(json.dumps({"negative": "zero_image"}))
    (path / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 1.5, "eos_token_id": [EOS, PAD], "do_sample": True, "temperature": 0.1, "top_k": 1}))
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="module")
def extras_pipe(extras):
    return inference.Pipeline.from_checkpoint(extras, mesh=inference.inference_mesh(1), load_decoder_weights=False)


def test_checkpoint_defaults_win(extras_pipe):
    assert extras_pipe.negative == "zero_image"  # the checkpoint's pipeline.json over the released default
    assert extras_pipe.repetition_penalty == 1.5 and {EOS, PAD} <= set(extras_pipe.stop_token_ids())
    assert "shift=3.0" in extras_pipe.flow_source and "scheduler_config.json" in extras_pipe.flow_source


def test_dit_scheduler_config_drives_the_sampler(released, extras, extras_pipe, pipe, tmp_path):
    """scheduler/scheduler_config.json at the checkpoint root sets the sampler's shift: the guided loop
    equals the PyTorch loop stepping diffusers' scheduler loaded from that file."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.references.blip3o import DIT
    from tests.references.flow import guided_sample

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(extras / "scheduler")
    assert sched.config.shift == 3.0
    steps = 3
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    sigmas, timesteps = flow.sampling_schedule(steps, extras_pipe.model.gen_head.flow_cfg.shift,
                                               extras_pipe.model.gen_head.flow_cfg.num_train_timesteps)
    np.testing.assert_array_equal(sigmas, sched.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, sched.timesteps.long().numpy())

    rng = np.random.RandomState(0)
    z = rng.randn(1, N_QUERY, 64).astype(np.float32)
    noise = rng.randn(1, *extras_pipe.model.gen_head.target_shape).astype(np.float32)
    got = np.asarray(extras_pipe.model.sample_features(z, noise, num_steps=steps))
    want = guided_sample(released["dit"], released["cap"], DIT, z, noise, steps, sched=sched)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    unshifted = np.asarray(pipe.model.sample_features(z, noise, num_steps=steps))
    assert np.abs(unshifted - got).max() > 1e-2 * np.abs(want).max()

    # --dit-scheduler PATH overrides; fields the sampler does not implement are refused by name.
    FlowMatchEulerDiscreteScheduler(shift=2.0).save_pretrained(tmp_path / "s2")
    assert checkpoints_lib.read_dit_scheduler(str(tmp_path / "s2")) == {"shift": 2.0, "num_train_timesteps": 1000}
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).save_pretrained(tmp_path / "dyn")
    with pytest.raises(checkpoints_lib.CheckpointError, match="use_dynamic_shifting=True"):
        checkpoints_lib.read_dit_scheduler(str(tmp_path / "dyn"))
    with pytest.raises(checkpoints_lib.CheckpointError, match="use_dynamic_shifting"):
        inference.Pipeline.from_checkpoint(extras, mesh=inference.inference_mesh(1), load_decoder_weights=False,
                                           dit_scheduler=str(tmp_path / "dyn"))


def test_generation_config_repetition_penalty_matches_transformers(checkpoints, extras, extras_pipe, pipe, released,
                                                                   tmp_path):
    """generation_config.json's repetition_penalty and eos ids, greedy: token-identical to transformers'
    generate(..., repetition_penalty=1.5); --nogeneration-config gives the plain greedy answer."""
    image, question = _image(0), "What color is the shape ?"
    patches, grid = pipe.processor.preprocess_one(image)
    prompt = inference.chat.understanding_prompt(question, inference.chat.num_image_tokens(grid))
    ids = torch.tensor([pipe.tokenizer.encode(prompt, add_special_tokens=False)])

    def reference(**kw):
        with torch.no_grad():
            out = released["qwen"].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(patches),
                image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(ids == IMAGE).long(), max_new_tokens=16,
                do_sample=False, eos_token_id=[EOS, PAD], pad_token_id=PAD, **kw)[0, ids.shape[1]:].tolist()
        return out[: next((i for i, t in enumerate(out) if t in (EOS, PAD)), len(out))]

    want = reference(repetition_penalty=1.5)
    plain = reference()
    assert want != plain  # the penalty changes this answer, so the comparison means something
    assert extras_pipe.understand_tokens(image, question, max_new_tokens=16) == want
    assert pipe.understand_tokens(image, question, max_new_tokens=16, repetition_penalty=1.5) == want
    assert extras_pipe.understand_tokens(image, question, max_new_tokens=16, repetition_penalty=1.0) == plain

    Image.fromarray(image).save(tmp_path / "q.png")
    base = ["--checkpoint", str(extras), "--image", str(tmp_path / "q.png"), "--question", question,
            "--max-new-tokens", "16", "--devices", "1"]
    decode_text = lambda t: pipe.tokenizer.decode(t, skip_special_tokens=True).strip()  # noqa: E731
    assert understand.main(base) == decode_text(want)
    assert understand.main([*base, "--nogeneration-config"]) == decode_text(plain)


def test_autoencode_resize_crop_and_squash(checkpoints, pipe, tmp_path):
    """crop = the repository's inference.py (centred square, offsets rounded down, then Resize((S, S)));
    squash = pipeline_reconstruct.py (Resize((S, S))); PIL bicubic + CLIP normalisation in numpy."""
    _, dst, _ = checkpoints
    image = _image(7, 60, 91)  # odd margin: offset (91 - 60) // 2 = 15, where rounding would give 16
    side = pipe.model.target_encoder.cfg.image_size
    mean = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
    std = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)

    def reference(pil):
        x = np.asarray(pil.resize((side, side), Image.Resampling.BICUBIC), np.float32) / np.float32(255)
        return ((x - mean) / std)[None]

    crop = reference(Image.fromarray(image[:, 15:75]))
    squash = reference(Image.fromarray(image))
    with inference.jax.set_mesh(pipe.mesh):
        want_crop = np.asarray(pipe.model.target_features(crop))
        want_squash = np.asarray(pipe.model.target_features(squash))
    got_crop = pipe.target_features([image])  # the default
    np.testing.assert_allclose(got_crop, want_crop, rtol=1e-6, atol=1e-6 * np.abs(want_crop).max())
    np.testing.assert_allclose(pipe.target_features([image], "squash"), want_squash, rtol=1e-6,
                               atol=1e-6 * np.abs(want_squash).max())
    assert np.abs(want_crop - want_squash).max() > 1e-3 * np.abs(want_crop).max()

    Image.fromarray(image).save(tmp_path / "in.png")
    generate.main(["--checkpoint", str(dst), "--image", str(tmp_path / "in.png"), "--autoencode", "--resize", "squash",
                   "--features-out", str(tmp_path / "s.npy"), *STEPS])
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), want_squash, rtol=1e-6,
                               atol=1e-6 * np.abs(want_squash).max())


def test_eval_vqa_official_defaults(checkpoints, released, pipe, tmp_path):
    """eval vqa = lmms-eval's BLIP3-o class: the image saved as JPEG by PIL with its default quality, then
    transformers' Qwen2.5-VL processor with min_pixels 200704 / max_pixels 1605632, then greedy generate."""
    import io

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _, dst, _ = checkpoints
    image, question = _image(8, 60, 90), "What color is the shape ?"
    Image.fromarray(image).save(tmp_path / "v.png")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")  # as the official class: no quality argument
    jpeg = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    np.testing.assert_array_equal(np.asarray(inference.jpeg_round_trip(image, eval_lib.EVAL_JPEG_QUALITY)),
                                  np.asarray(jpeg))
    processed = Qwen2VLImageProcessorPil(min_pixels=200704, max_pixels=1605632)([jpeg], return_tensors="np")
    patches, grid = processed["pixel_values"], [int(g) for g in processed["image_grid_thw"][0]]
    assert grid[1] * grid[2] * 14 * 14 >= 200704  # upsized to the official minimum
    prompt = inference.chat.understanding_prompt(question, inference.chat.num_image_tokens(grid))
    ids = torch.tensor([pipe.tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        out = released["qwen"].generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(patches),
            image_grid_thw=torch.tensor([grid]), mm_token_type_ids=(ids == IMAGE).long(), max_new_tokens=8,
            do_sample=False, eos_token_id=[EOS, PAD], pad_token_id=PAD)[0, ids.shape[1]:].tolist()
    want = pipe.tokenizer.decode(out[: next((i for i, t in enumerate(out) if t in (EOS, PAD)), len(out))],
                                 skip_special_tokens=True).strip()
    (tmp_path / "qa.jsonl").write_text(json.dumps({"image": "v.png", "question": question, "answer": want}) + "\n")
    preds = tmp_path / "p.jsonl"
    result = eval_lib.main(["vqa", "--checkpoint", str(dst), "--data", str(tmp_path / "qa.jsonl"), "--devices", "1",
                            "--max-new-tokens", "8", "--predictions-out", str(preds)])
    assert json.loads(preds.read_text())["prediction"] == want and result["accuracy"] == 1.0


def test_repetition_penalty_is_transformers_processor():
    """decode.apply_repetition_penalty = transformers' RepetitionPenaltyLogitsProcessor (negative logits
    multiplied, others divided, each id once however often it occurs)."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from blip3o_jax import decode

    rng = np.random.RandomState(0)
    logits = rng.randn(3, 40).astype(np.float32) * 3
    ids = rng.randint(0, 40, (3, 9))
    ids[0, :3] = 5  # repeats count once
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, ids, True, axis=1)
    np.testing.assert_array_equal(np.asarray(decode.apply_repetition_penalty(logits, seen, np.float32(1.3))), want)
