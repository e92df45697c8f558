"""``python -m blip3o_jax.understand``: image + question -> answer text (contract 1; docs/model.md 3.2).

    python -m blip3o_jax.understand --checkpoint DIR --image photo.jpg --question "What is in the picture?"
    python -m blip3o_jax.understand --checkpoint DIR --image a.png --question Q --temperature 0.7 --top-p 0.9 --seed 1

Greedy decoding by default (as the reference's evaluation); ``--temperature`` > 0 samples with nucleus
``--top-p``, reproducibly for a ``--seed``. The image goes through the numpy Qwen2.5-VL processor
(min/max pixels from the checkpoint's preprocessor_config.json when present, ``--min-pixels`` /
``--max-pixels`` override), the prompt is the Qwen chat template with the image first, and the
answer comes from the KV-cache decoder (decode.generate), stopping at ``<|im_end|>``. A checkpoint's
``generation_config.json`` adds its repetition penalty and eos ids (``--repetition-penalty``,
``--nogeneration-config`` override); ``--jpeg-quality Q`` re-encodes the image as JPEG first, as the
official lmms-eval evaluation does (Q = 75 there).
"""

from __future__ import annotations

from absl import flags

from blip3o_jax import cli, inference


def define_flags(fv: flags.FlagValues) -> None:
    cli.define_checkpoint_flags(fv)
    flags.DEFINE_string("image", None, "input image", required=True, flag_values=fv)
    flags.DEFINE_string("question", None, "question about the image", required=True, flag_values=fv)
    flags.DEFINE_integer("max-new-tokens", 128, "answer length limit in tokens", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy", flag_values=fv)
    flags.DEFINE_float("top-p", 1.0, "nucleus sampling mass (with --temperature > 0)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed (with --temperature > 0)", flag_values=fv)
    cli.define_understanding_flags(fv)


def main(argv=None) -> str:
    args = cli.parse(argv, define_flags, __doc__)
    pipe = inference.Pipeline.from_checkpoint(args.checkpoint, mesh=inference.inference_mesh(args.devices),
                                              **cli.checkpoint_kwargs(args), load_decoder_weights=False,
                                              **cli.understanding_kwargs(args))
    answer = pipe.understand(inference.open_image(args.image), args.question, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(answer)
    return answer


def run() -> None:
    """``python -m blip3o_jax.understand`` and the ``blip3o-understand`` console script."""
    cli.run(main, own_flags=True)


if __name__ == "__main__":
    run()
