"""``python -m blip3o_jax.understand``: image + question -> answer text (contract 1; reference 3.2).

    python -m blip3o_jax.understand --checkpoint DIR --image photo.jpg --question "What is in the picture?"
    python -m blip3o_jax.understand --checkpoint DIR --image a.png --question Q --temperature 0.7 --top-p 0.9 --seed 1

Greedy decoding by default (as the reference's evaluation); ``--temperature`` > 0 samples with nucleus
``--top-p``, reproducibly for a ``--seed``. The image goes through the numpy Qwen2.5-VL processor
(min/max pixels from the checkpoint's preprocessor_config.json when present, ``--min-pixels`` /
``--max-pixels`` override), the prompt is the Qwen chat template with the image first, and the
answer comes from the KV-cache decoder (decode.generate), stopping at ``<|im_end|>``.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip3o_jax.understand", description="BLIP3-o image understanding")
    p.add_argument("--checkpoint", required=True, help="Orbax checkpoint, PyTorch directory or demo workdir")
    p.add_argument("--image", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the checkpoint's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    p.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    return p


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    from blip3o_jax import inference

    kw = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    pipe = inference.Pipeline.from_checkpoint(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype,
                                              mesh=inference.inference_mesh(args.devices),
                                              load_decoder_weights=False, **kw)
    answer = pipe.understand(inference.open_image(args.image), args.question, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(answer)
    return answer


if __name__ == "__main__":
    main()
