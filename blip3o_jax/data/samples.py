"""Training samples exactly as the reference builds them (docs/model.md 3.4, 4.3, 4.4, 11).

Generation (text -> image), as BLIP3-o's ``preprocess_qwen`` + ``DataCollatorForSupervisedDataset``:

1. three chat messages, each ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` tokenized on its own:
   system "You are a helpful assistant.", user "Please generate image based on the following caption:
   {txt}", assistant "" (the ``<image>`` placeholder of the gpt turn is replaced by an empty string);
   labels are -100 for the system and user messages and the token ids for the assistant message;
2. the text is cut to its first ``max_length - (n_query + 1)`` tokens (447 for the released recipe),
   so very long captions lose the end of the template, as in the reference;
3. ``gen_start_token_id`` ([IMG], 151665) and ``n_query`` x ``query_token_id`` (<image>, 151667) are
   appended to ids *and* labels (the reference labels them with their ids; the LM loss is discarded);
4. ``query_start = len(text) + 1`` (the reference's ``i_s_pos``) is the index of the first query slot;
5. right padding to ``max_length`` with ``pad_token_id`` (labels -100); ``attention_mask = ids != pad``.

Understanding (image -> text): BLIP3-o's understanding is stock Qwen2.5-VL (docs/model.md 3.2), so the
first user turn is the Qwen2.5-VL template's ``<|vision_start|>`` + n x ``<|image_pad|>`` +
``<|vision_end|>`` + question (``chat.understanding_prompt``, the form inference uses) with
n = grid_t * grid_h * grid_w / merge_size^2 for the Qwen2.5-VL processor output of the image; labels,
as in the reference's ``preprocess_qwen``, are -100 on system and user messages and the ids of every
assistant message (the loss is on the answers). Pixel patches are zero-padded to a fixed
``max_patches`` rows (``num_patches`` holds the valid count) so batches have fixed shapes.

The transforms (``GenerationTransform``, ``UnderstandingTransform``) run inside Grain worker
processes: raw record -> decoded, preprocessed, tokenized sample of fixed shapes, or ``skip(reason)``
for a bad record (counted by the pipeline; never raised).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from blip3o_jax.data import chat, preprocess
from blip3o_jax.data.preprocess import ImagePreprocessor
from blip3o_jax.data.qwen_image_processor import QwenImageProcessor, smart_resize, to_rgb

IGNORE_INDEX = -100

# Skip reasons (the keys of the pipeline's counters).
BAD_IMAGE = "bad_image"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
MISSING_QA = "missing_qa"
TOO_LONG = "too_long"
TOO_MANY_PATCHES = "too_many_patches"

SKIP_KEY = "__skip__"


def skip(reason: str, key: str = "") -> dict:
    """The element a transform returns instead of a sample; the pipeline counts and drops it."""
    return {SKIP_KEY: reason, "key": key}


def is_skip(element: dict) -> bool:
    return SKIP_KEY in element


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the sample layout needs (config.model.*_token_id; defaults = Qwen2.5 / BLIP3-o)."""

    pad: int = 151643  # <|endoftext|>
    image_pad: int = 151655  # <|image_pad|>
    vision_start: int = 151652
    vision_end: int = 151653
    gen_start: int = 151665  # [IMG]
    query: int = 151667  # <image>

    @classmethod
    def from_config(cls, model_cfg) -> SpecialIds:
        m = model_cfg
        return cls(pad=m.pad_token_id, image_pad=m.image_pad_token_id, vision_start=m.vision_start_token_id,
                   vision_end=m.vision_end_token_id, gen_start=m.gen_start_token_id, query=m.query_token_id)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without BOS/EOS from a `tokenizers.Tokenizer` or a transformers tokenizer."""
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return list(tokenizer.encode(text, add_special_tokens=False))


def _pad(ids: list[int], labels: list[int], max_length: int, pad_id: int) -> dict[str, np.ndarray]:
    n = len(ids)
    input_ids = np.full((max_length,), pad_id, np.int32)
    out_labels = np.full((max_length,), IGNORE_INDEX, np.int32)
    input_ids[:n] = ids
    out_labels[:n] = labels
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).astype(np.int32), "labels": out_labels}


GENERATION_PROMPTS = ("training", "inference")


def generation_tokens(tokenizer, caption: str, *, max_length: int, n_query: int,
                      ids: SpecialIds = SpecialIds(), prompt: str = "training") -> dict[str, np.ndarray]:
    """input_ids, attention_mask, labels (max_length,) int32 and query_start () int32 for one caption.

    ``prompt`` (config.data.generation_prompt): "training" is the reference's training sequence (empty,
    closed assistant turn, chat.t2i_training_prompt); "inference" ends with the open assistant turn
    that inference conditions on (chat.t2i_prompt), removing the reference's train/inference mismatch
    (docs/model.md 4.4): a small backbone's query states differ a lot between the two (configs/demo.py)."""
    if prompt not in GENERATION_PROMPTS:
        raise ValueError(f"generation prompt {prompt!r}; allowed: {GENERATION_PROMPTS}")
    # Messages tokenized one by one as preprocess_qwen does; together they are chat.t2i_training_prompt
    # (or chat.t2i_prompt).
    assistant = chat.turn("assistant", "") if prompt == "training" else chat.assistant_start()
    parts = [
        (encode(tokenizer, chat.turn("system", chat.SYSTEM_PROMPT)), False),
        (encode(tokenizer, chat.turn("user", chat.T2I_INSTRUCTION + caption)), False),
        (encode(tokenizer, assistant), True),
    ]
    text_ids = [t for part, _ in parts for t in part]
    labels = [t if trained else IGNORE_INDEX for part, trained in parts for t in part]
    budget = max_length - (n_query + 1)
    text_ids, labels = text_ids[:budget], labels[:budget]
    slots = [ids.gen_start] + [ids.query] * n_query
    out = _pad(text_ids + slots, labels + slots, max_length, ids.pad)
    out["query_start"] = np.asarray(len(text_ids) + 1, np.int32)
    return out


def understanding_tokens(tokenizer, turns: Sequence[tuple[str, str]], num_image_tokens: int, *, max_length: int,
                         ids: SpecialIds = SpecialIds()) -> dict[str, np.ndarray] | None:
    """A (question, answer) conversation about one image; None if the image tokens do not fit."""
    ids_out: list[int] = []
    labels: list[int] = []

    def add(tokens: list[int], trained: bool):
        ids_out.extend(tokens)
        labels.extend(tokens if trained else [IGNORE_INDEX] * len(tokens))

    add(encode(tokenizer, chat.turn("system", chat.SYSTEM_PROMPT)), False)
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            # The image ids are inserted directly (no need to tokenize thousands of pad strings):
            # special tokens split the text before BPE, so the ids equal those of the whole string.
            image = [ids.vision_start] + [ids.image_pad] * num_image_tokens + [ids.vision_end]
            add(encode(tokenizer, chat.IM_START + "user\n") + image
                + encode(tokenizer, question + chat.IM_END + "\n"), False)
        else:
            add(encode(tokenizer, chat.turn("user", question)), False)
        add(encode(tokenizer, chat.turn("assistant", answer)), True)
    if len(ids_out) > max_length:
        image_end = ids_out.index(ids.vision_end) + 1
        if image_end > max_length:
            return None
        ids_out, labels = ids_out[:max_length], labels[:max_length]
    return _pad(ids_out, labels, max_length, ids.pad)


def conversation_from_meta(meta: dict, caption: str | None, caption_question: str | None) -> list[tuple[str, str]]:
    """(question, answer) turns from a record: ``json.qa`` [{question, answer}], LLaVA-style
    ``json.conversations`` [{from: human|gpt, value}], or (if ``caption_question``) the caption."""
    turns: list[tuple[str, str]] = []
    for item in meta.get("qa") or ():
        turns.append((str(item["question"]), str(item["answer"])))
    conv = meta.get("conversations") or ()
    for human, gpt in zip(conv[0::2], conv[1::2]):
        if human.get("from") == "human" and gpt.get("from") == "gpt":
            turns.append((str(human["value"]).replace("<image>", "").strip(), str(gpt["value"])))
    if not turns and caption_question and caption:
        turns.append((caption_question, caption))
    return turns


# ---------------------------------------------------------------------------------------------
# Decoding and the worker-side transforms


def decode_image(image: Any) -> Image.Image:
    """Encoded bytes or an (H, W, 3) uint8 array -> RGB PIL image; raises on anything undecodable."""
    if isinstance(image, np.ndarray):
        return to_rgb(image)
    pil = Image.open(io.BytesIO(image))
    pil.load()  # decode now: a truncated or corrupt file fails here, not later in a resize
    return to_rgb(pil)


def decode_record_image(record: dict) -> Image.Image | dict:
    """A raw record's image as RGB, or a ``skip()`` marker when the record has an error, no image or an
    undecodable one (the caller returns the marker as the sample)."""
    if record.get("error"):
        return skip(record["error"], record["key"])
    if record.get("image") is None:
        return skip(MISSING_IMAGE, record["key"])
    try:
        return decode_image(record["image"])
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; all mean "skip"
        logging.debug("undecodable image %s: %s", record["key"], e)
        return skip(BAD_IMAGE, record["key"])


@dataclasses.dataclass
class GenerationTransform:
    """raw record -> {input_ids, attention_mask, labels, query_start, target_image, key} or skip().

    ``target_image`` (image_size, image_size, 3) float32 is the target encoder's input (docs/model.md 8.1:
    shorter side resized bicubic, center crop, [0, 1], the encoder's mean/std). A record of a
    precomputed data set (``sources.PrecomputedSource``) gives ``target_features`` (N, C) float32
    instead, and, with ``use_condition``, its stored ``condition`` (n_query, H)."""

    tokenizer: Any
    max_length: int
    n_query: int
    image_size: int
    target_encoder: str = "eva_clip"
    ids: SpecialIds = SpecialIds()
    use_condition: bool = False
    prompt: str = "training"  # config.data.generation_prompt (see generation_tokens)

    def __post_init__(self):
        # No encoder (target_encoder "none") is fine as long as every record is precomputed.
        self.preprocessor = (preprocess.for_encoder(self.target_encoder, self.image_size)
                             if self.target_encoder != "none" else None)

    def __call__(self, record: dict) -> dict:
        caption = record.get("caption")
        if not record.get("error") and (caption is None or not caption.strip()):
            return skip(MISSING_CAPTION, record["key"])
        if "target_features" in record and not record.get("error"):
            out = generation_tokens(self.tokenizer, caption, max_length=self.max_length, n_query=self.n_query,
                                    ids=self.ids, prompt=self.prompt)
            out["target_features"] = record["target_features"]
            if self.use_condition:
                if "condition" not in record:
                    raise ValueError("data.precomputed_condition is set but the precomputed data set holds no "
                                     "condition states (precompute it with precompute.with_condition=True)")
                out["condition"] = record["condition"]
            out["key"] = record["key"]
            return out
        if self.preprocessor is None:
            raise ValueError("model.target_encoder='none' can only train on precomputed target features")
        image = decode_record_image(record)
        if isinstance(image, dict):
            return image
        out = generation_tokens(self.tokenizer, caption, max_length=self.max_length, n_query=self.n_query,
                                ids=self.ids, prompt=self.prompt)
        out["target_image"] = self.preprocessor(image)
        out["key"] = record["key"]
        return out


@dataclasses.dataclass
class UnderstandingTransform:
    """raw record -> {input_ids, attention_mask, labels, pixel_values (max_patches, 1176), num_patches,
    image_grid_thw (3,), key} or skip(). The image is first resized (shorter side) and center-cropped
    to ``image_size`` as the reference does for understanding images (448), then run through the
    Qwen2.5-VL processor; ``max_patches`` defaults to that square's patch count. ``max_turns`` keeps
    that many of a record's question/answer pairs, chosen afresh for every pass over the record from
    (seed, stream index); None keeps all of them, in order."""

    tokenizer: Any
    max_length: int
    image_size: int = 448
    max_patches: int | None = None
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    caption_question: str | None = None
    max_turns: int | None = None
    seed: int = 0
    ids: SpecialIds = SpecialIds()

    def __post_init__(self):

        self.geometry = ImagePreprocessor(self.image_size).geometry  # resize + center crop, still uint8
        self.processor = QwenImageProcessor(min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if self.max_patches is None:
            factor = self.processor.patch_size * self.processor.merge_size
            h, w = smart_resize(self.image_size, self.image_size, factor, self.min_pixels, self.max_pixels)
            self.max_patches = (h // self.processor.patch_size) * (w // self.processor.patch_size)

    def __call__(self, record: dict) -> dict:
        turns = [] if record.get("error") else conversation_from_meta(
            record.get("meta") or {}, record.get("caption"), self.caption_question)
        if not record.get("error") and not turns:
            return skip(MISSING_QA, record["key"])
        if self.max_turns is not None and len(turns) > self.max_turns:
            rng = np.random.default_rng((self.seed, record.get("stream_index", 0)))
            turns = [turns[i] for i in sorted(rng.choice(len(turns), self.max_turns, replace=False))]
        image = decode_record_image(record)
        if isinstance(image, dict):
            return image
        image = self.geometry(image)
        patches, grid = self.processor.preprocess_one(image)
        if patches.shape[0] > self.max_patches:
            return skip(TOO_MANY_PATCHES, record["key"])
        n_tokens = chat.num_image_tokens(grid, self.processor.merge_size)
        out = understanding_tokens(self.tokenizer, turns, n_tokens, max_length=self.max_length, ids=self.ids)
        if out is None:
            return skip(TOO_LONG, record["key"])
        pixel_values = np.zeros((self.max_patches, patches.shape[1]), np.float32)
        pixel_values[: patches.shape[0]] = patches
        out.update(pixel_values=pixel_values, num_patches=np.asarray(patches.shape[0], np.int32),
                   image_grid_thw=np.asarray(grid, np.int32), key=record["key"])
        return out


# ---------------------------------------------------------------------------------------------
# blip3o_jax.precompute's worker side: raw record -> preprocessed image (+ prompt tokens)


class SelectedRecords:
    """The records ``indices`` of a source, in that order (a Grain random-access source)."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[int(i)])]


@dataclasses.dataclass
class PrecomputeTransform:
    """raw record -> {key, caption, meta, target_image[, input_ids, attention_mask, query_start]} or
    ``skip(reason)``, with the validity rules and preprocessing of training
    (``GenerationTransform``). Prompt tokens only when a tokenizer is given (condition states)."""

    image_size: int
    target_encoder: str
    tokenizer: Any = None
    max_length: int = 0
    n_query: int = 0
    ids: SpecialIds = SpecialIds()
    prompt: str = "training"  # config.data.generation_prompt

    def __post_init__(self):
        self.preprocessor = preprocess.for_encoder(self.target_encoder, self.image_size)

    def __call__(self, record: dict) -> dict:
        caption = record.get("caption")
        if not record.get("error") and (caption is None or not caption.strip()):
            return skip(MISSING_CAPTION, record["key"])
        image = decode_record_image(record)
        if isinstance(image, dict):
            return image
        meta = record.get("meta") or {}
        out = {"key": record["key"], "caption": caption,
               "meta": json.dumps(meta, sort_keys=True, default=str) if meta else None,
               "target_image": self.preprocessor(image)}
        if self.tokenizer is not None:
            tokens = generation_tokens(self.tokenizer, caption, max_length=self.max_length,
                                                   n_query=self.n_query, ids=self.ids, prompt=self.prompt)
            out.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       query_start=tokens["query_start"])
        return out
