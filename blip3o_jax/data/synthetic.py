"""The demo's synthetic data set and tokenizer (made locally; nothing is downloaded).

Images: one or two coloured shapes (circle / square / triangle; red / green / blue / yellow; small or
large; on the left / right / at the top / bottom) drawn with PIL on a white ``image_size`` square.
Captions: "a red circle on the left" (two objects: "... and a blue square on the right").
Question/answer pairs in the ``json`` member: "What color is the shape?" -> "red", "What shape is
it?" -> "circle", "Where is the shape?" -> "left" (two objects: "What color is the circle?",
"What shape is on the left?"), plus "Describe the image." -> the caption and a text-to-image request
for another object -> its words in a random order ("left red circle"); half the samples shuffle them.
The ``json`` also lists the objects with their boxes, for scoring.

Everything is written as REAL webdataset tar shards (``{key}.png``, ``{key}.txt``, ``{key}.json``), so
the demo exercises the same tar source as real BLIP3-o data, and it is a pure function of the seed
(byte-identical shards).

The tokenizer is a byte-level BPE trained with ``tokenizers`` on the demo's language (about 0.1 s);
its special tokens sit at the ids configs/demo.py expects (``DEMO_SPECIAL_TOKENS``) and it is saved
with ``save_pretrained`` (tokenizer.json + tokenizer_config.json), loadable with transformers'
``PreTrainedTokenizerFast.from_pretrained(dir)``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from blip3o_jax.data import chat
from blip3o_jax.data.sources import write_tar_shard

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SIZES = {"small": 0.22, "large": 0.34}  # object width as a fraction of the image side
DESCRIBE_QUESTION = "Describe the image."

# Special tokens and their ids in the demo vocabulary (configs/demo.py: vocab_size 1024).
DEMO_SPECIAL_TOKENS = {
    "<|endoftext|>": 1000,  # pad_token_id
    "<|image_pad|>": 1001,
    "<|vision_start|>": 1002,
    "<|vision_end|>": 1003,
    "[IMG]": 1004,  # gen_start_token_id
    "<image>": 1005,  # query_token_id
    "<|im_start|>": 1006,
    "<|im_end|>": 1007,
    "[/IMG]": 1008,
}
DEMO_VOCAB_SIZE = 1024


# ---------------------------------------------------------------------------------------------
# Scenes


def caption_of(objects: Sequence[dict]) -> str:
    return " and ".join(f"a {o['color']} {o['shape']} {POSITION_PHRASE[o['position']]}" for o in objects)


def questions_of(objects: Sequence[dict]) -> list[dict]:
    if len(objects) == 1:
        o = objects[0]
        return [{"question": "What color is the shape?", "answer": o["color"]},
                {"question": "What shape is it?", "answer": o["shape"]},
                {"question": "Where is the shape?", "answer": o["position"]}]
    qa = []
    for o in objects:
        qa.append({"question": f"What color is the {o['shape']}?", "answer": o["color"]})
        qa.append({"question": f"What shape is {POSITION_PHRASE[o['position']]}?", "answer": o["shape"]})
    return qa


def random_scene(rng: np.random.Generator, two_objects: bool) -> list[dict]:
    """Objects of a scene; two objects sit on opposite sides and have different shapes."""
    position = str(rng.choice(list(POSITIONS)))
    shapes = rng.choice(SHAPES, size=2, replace=False)
    objects = [{"shape": str(shapes[0]), "color": str(rng.choice(list(COLORS))), "position": position,
                "size": str(rng.choice(list(SIZES)))}]
    if two_objects:
        objects.append({"shape": str(shapes[1]), "color": str(rng.choice(list(COLORS))),
                        "position": OPPOSITE[position], "size": str(rng.choice(list(SIZES)))})
    return objects


def render(objects: Sequence[dict], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draws the objects (with small jitter of place and colour) and records each one's box."""
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in objects:
        fx, fy = POSITIONS[o["position"]]
        cx = (fx + rng.uniform(-0.04, 0.04)) * image_size
        cy = (fy + rng.uniform(-0.04, 0.04)) * image_size
        r = SIZES[o["size"]] * image_size / 2
        color = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLORS[o["color"]])
        box = [cx - r, cy - r, cx + r, cy + r]
        if o["shape"] == "circle":
            draw.ellipse(box, fill=color)
        elif o["shape"] == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        o["bbox"] = [round(v, 2) for v in box]
    return image


def make_sample(index: int, rng: np.random.Generator, image_size: int, two_object_fraction: float) -> dict:
    """One webdataset sample dict {"__key__", "png", "txt", "json"}."""
    objects = random_scene(rng, bool(rng.random() < two_object_fraction))
    image = render(objects, image_size, rng)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    # The turns of an understanding sample: the attribute questions and a description (the caption). Half
    # the samples keep this canonical order, where the turn number alone tells which attribute is asked:
    # that lets a model trained from scratch learn to read the image first. The other half are shuffled,
    # so answering right also needs the question (a fixed order for all makes the model ignore it).
    # A text turn teaches the tiny backbone to read a text-to-image prompt, as a pretrained LLM can: asked
    # for another scene's image, the assistant restates the object's colour, shape and position words in
    # a random order ("top red circle", "circle red top", ...). The generation stage freezes the backbone,
    # and its query states carry only what the backbone's attention brings from the prompt; a random order
    # makes the state that predicts the first word hold all three. Measured on the demo's 48 prompts
    # (query states: across-prompt spread / norm, and distance between prompts that differ only in top vs
    # bottom; DiT samples: position read by the nearest feature centroid): the prompt restated in its own
    # order ("red circle at the top") 0.16, 1.0, 0.75-0.79; the words in a random order 0.55, 3.6, 0.88.
    prompt_object = random_scene(rng, two_objects=False)[0]
    words = [prompt_object["color"], prompt_object["shape"], prompt_object["position"]]
    restated = " ".join(words[i] for i in rng.permutation(len(words)))
    qa = questions_of(objects) + [{"question": DESCRIBE_QUESTION, "answer": caption_of(objects)},
                                  {"question": chat.T2I_INSTRUCTION + caption_of([prompt_object]), "answer": restated}]
    order = rng.permutation(len(qa)) if rng.random() < 0.5 else range(len(qa))
    meta = {"objects": objects, "qa": [qa[i] for i in order]}
    return {"__key__": f"{index:08d}", "png": buf.getvalue(), "txt": caption_of(objects),
            "json": json.dumps(meta, sort_keys=True)}


def write_synthetic_shards(out_dir: str, *, num_samples: int = 2048, image_size: int = 64, seed: int = 0,
                           samples_per_shard: int = 512, two_object_fraction: float = 0.25) -> list[str]:
    """Writes ``synthetic-NNNNN.tar`` shards into ``out_dir``; the same arguments give identical bytes.

    Re-running with the same arguments reuses finished shards (a ``synthetic.json`` records them).
    """
    os.makedirs(out_dir, exist_ok=True)
    spec = dict(num_samples=num_samples, image_size=image_size, seed=seed, samples_per_shard=samples_per_shard,
                two_object_fraction=two_object_fraction)
    n_shards = -(-num_samples // samples_per_shard)
    paths = [os.path.join(out_dir, f"synthetic-{i:05d}.tar") for i in range(n_shards)]
    marker = os.path.join(out_dir, "synthetic.json")
    if os.path.exists(marker) and all(os.path.exists(p) for p in paths):
        with open(marker) as f:
            if json.load(f) == spec:
                return paths
    rng = np.random.default_rng(seed)
    for s, path in enumerate(paths):
        lo, hi = s * samples_per_shard, min((s + 1) * samples_per_shard, num_samples)
        shard = [make_sample(i, rng, image_size, two_object_fraction) for i in range(lo, hi)]
        write_tar_shard(path + ".tmp", shard)
        os.replace(path + ".tmp", path)
    with open(marker, "w") as f:
        json.dump(spec, f)
    return paths


# ---------------------------------------------------------------------------------------------
# Tokenizer


def demo_corpus() -> list[str]:
    """Every caption, question and answer the demo can produce, plus the prompt templates."""
    single = [[{"shape": s, "color": c, "position": p}] for s in SHAPES for c in COLORS for p in POSITIONS]
    texts = [caption_of(o) for o in single]
    for o in single:
        texts += [qa["question"] for qa in questions_of(o)] + [qa["answer"] for qa in questions_of(o)]
        other = dict(o[0], position=OPPOSITE[o[0]["position"]])
        texts += [caption_of([o[0], other])] + [qa["question"] for qa in questions_of([o[0], other])]
    texts += [chat.SYSTEM_PROMPT, chat.T2I_INSTRUCTION, "system", "user", "assistant", DESCRIBE_QUESTION] * 8
    return texts


def train_demo_tokenizer(out_dir: str | None = None):
    """Byte-level BPE over the demo language with the special tokens at DEMO_SPECIAL_TOKENS' ids.

    Returns a transformers ``PreTrainedTokenizerFast``; if ``out_dir`` is given it is also saved there.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    first_special = min(DEMO_SPECIAL_TOKENS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=first_special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(demo_corpus(), trainer=trainer)
    # Fill the ids the merges did not use, so the special tokens land exactly on their ids.
    fillers = [f"<|reserved_{i}|>" for i in range(tok.get_vocab_size(with_added_tokens=True), first_special)]
    specials = sorted(DEMO_SPECIAL_TOKENS, key=DEMO_SPECIAL_TOKENS.get)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fillers + specials])
    for t, i in DEMO_SPECIAL_TOKENS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    assert tok.get_vocab_size(with_added_tokens=True) <= DEMO_VOCAB_SIZE
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   padding_side="right")
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def prepare_demo_data(data_dir: str, *, image_size: int = 64, num_samples: int = 2048, seed: int = 0):
    """(shard paths, tokenizer) under ``data_dir``; cheap when they already exist."""
    paths = write_synthetic_shards(os.path.join(data_dir, "shards"), num_samples=num_samples,
                                   image_size=image_size, seed=seed)
    tok_dir = os.path.join(data_dir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return paths, PreTrainedTokenizerFast.from_pretrained(tok_dir)
    return paths, train_demo_tokenizer(tok_dir)
