"""The Qwen chat template used by BLIP3-o, as plain string builders (docs/model.md 3.1, 3.2, 3.3a, 4.4).

Every prompt is ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message with the system message
"You are a helpful assistant.", then the assistant turn. Three forms exist:

- text-to-image inference (3.1 step 1): ends with the open assistant turn ``<|im_start|>assistant\\n``;
  the model then appends the [IMG] marker and the learned queries.
- text-to-image training (4.4): the assistant turn is empty and closed, ``...assistant\\n<|im_end|>\\n``
  (the reference's train/inference mismatch is kept on purpose).
- image understanding (3.2): images as ``<|vision_start|>`` + one ``<|image_pad|>`` per merged ViT token
  + ``<|vision_end|>`` before the question (what the Hugging Face Qwen2.5-VL processor produces after
  expanding its template), then the open assistant turn.

Strings only: tokenization belongs to the caller's tokenizer (Qwen adds no BOS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SYSTEM_PROMPT = "You are a helpful assistant."
T2I_INSTRUCTION = "Please generate image based on the following caption: "

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


def turn(role: str, content: str) -> str:
    """One closed message: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def assistant_start() -> str:
    """The open assistant turn that generation continues from."""
    return f"{IM_START}assistant\n"


def conversation(user: str, system: str = SYSTEM_PROMPT) -> str:
    """System + user turns + the open assistant turn."""
    return turn("system", system) + turn("user", user) + assistant_start()


def t2i_prompt(caption: str) -> str:
    """Text-to-image inference prompt (docs/model.md 3.1 step 1)."""
    return conversation(T2I_INSTRUCTION + caption)


def t2i_training_prompt(caption: str) -> str:
    """Text-to-image training prompt (docs/model.md 4.4): empty, closed assistant turn."""
    return turn("system", SYSTEM_PROMPT) + turn("user", T2I_INSTRUCTION + caption) + turn("assistant", "")


def image_placeholder(num_tokens: int) -> str:
    """``<|vision_start|>`` + num_tokens x ``<|image_pad|>`` + ``<|vision_end|>`` for one image."""
    if num_tokens < 1:
        raise ValueError(f"an image needs at least one token, got {num_tokens}")
    return VISION_START + IMAGE_PAD * num_tokens + VISION_END


def num_image_tokens(grid_thw: Sequence[int], spatial_merge_size: int = 2) -> int:
    """LLM tokens of one image with processor grid (t, h, w): t*h*w / merge^2."""
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // spatial_merge_size**2


def understanding_prompt(question: str, image_tokens: int | Iterable[int] = (), system: str = SYSTEM_PROMPT) -> str:
    """Image(s) + question prompt (docs/model.md 3.2), images first as in the Qwen2.5-VL template.

    image_tokens: number of LLM tokens per image (see num_image_tokens); an int for one image.
    """
    counts = [image_tokens] if isinstance(image_tokens, (int, np.integer)) else list(image_tokens)
    return conversation("".join(image_placeholder(int(n)) for n in counts) + question, system)


__all__ = [
    "SYSTEM_PROMPT",
    "T2I_INSTRUCTION",
    "turn",
    "assistant_start",
    "conversation",
    "t2i_prompt",
    "t2i_training_prompt",
    "image_placeholder",
    "num_image_tokens",
    "understanding_prompt",
]
