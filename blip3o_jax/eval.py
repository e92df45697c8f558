"""``python -m blip3o_jax.eval``: evaluation data for the official scorers and exact-match VQA.

    python -m blip3o_jax.eval geneval --checkpoint DIR --prompts evaluation_metadata.jsonl --out OUT [--n-samples 4]
    python -m blip3o_jax.eval vqa --checkpoint DIR --data qa.jsonl [--max-new-tokens 16] [--predictions-out P.jsonl]

``geneval`` writes the folder layout the GenEval scorer (``evaluation/evaluate_images.py``) reads:
``OUT/00000/metadata.jsonl`` (the prompt's metadata line, unchanged), ``OUT/00000/samples/0000.png``,
... one folder per line of the prompts file (each line a JSON object with at least "prompt"). Images
for the same prompt share one batch; seeds are ``--seed`` + the prompt index, so a run can be
restarted (finished folders are skipped) or split across machines with ``--start`` / ``--end``.

``vqa`` reads JSON lines ``{"image": path (relative to the file's folder or absolute), "question": ...,
"answer": ...}`` and prints ``{"accuracy": f, "n": int}``: the fraction of greedy answers equal to the
reference after normalisation (surrounding whitespace, case and one trailing period ignored). Its
defaults are the official lmms-eval BLIP3-o class's: processor min_pixels 200704 (256 x 28 x 28) and
max_pixels 1605632 (2048 x 28 x 28), each image re-encoded as JPEG at quality 75 (that class saves with
PIL's default quality) before the processor, and the checkpoint's generation_config.json (repetition
penalty, eos ids) applied to greedy decoding.

Both are plain functions of an ``inference.Pipeline`` (``geneval``, ``vqa_accuracy``) so other code
(the demo report) uses the same paths.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence

from absl import app, flags

from blip3o_jax import cli, inference
from blip3o_jax.data import qwen_image_processor as qip

# The official lmms-eval class saves each image with PIL's ``save(format="JPEG")`` and no quality argument,
# i.e. PIL's (libjpeg's) default quality 75.
EVAL_JPEG_QUALITY = 75


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows


def geneval(pipe, metadata: Sequence[dict], out_dir: str, *, n_samples: int = 4, seed: int = 0, num_steps: int = 30,
            guidance: float = 3.0, decoder_steps: int = 50, decoder_guidance: float = 3.0, size: int | None = None,
            start: int = 0, end: int | None = None, skip_existing: bool = True) -> list[str]:
    """Writes OUT/{index:05d}/metadata.jsonl + samples/{k:04d}.png for prompts [start, end); returns
    the folders written. Every prompt's n_samples images are one batch (one compilation overall)."""
    written = []
    end = len(metadata) if end is None else min(end, len(metadata))
    for index in range(start, end):
        meta = metadata[index]
        if "prompt" not in meta:
            raise ValueError(f"prompts line {index} has no 'prompt': {meta}")
        folder = os.path.join(out_dir, f"{index:05d}")
        samples = os.path.join(folder, "samples")
        if skip_existing and all(os.path.exists(os.path.join(samples, f"{k:04d}.png")) for k in range(n_samples)):
            continue
        images, _ = pipe.generate_images([meta["prompt"]], seed=seed + index, num_steps=num_steps, guidance=guidance,
                                         num_images=n_samples, decoder_steps=decoder_steps,
                                         decoder_guidance=decoder_guidance, size=size)
        os.makedirs(samples, exist_ok=True)
        with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
            f.write(json.dumps(meta) + "\n")
        for k, image in enumerate(images):
            inference.save_png(image, os.path.join(samples, f"{k:04d}.png"))
        written.append(folder)
    return written


def normalize_answer(text: str) -> str:
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def vqa_accuracy(pipe, items: Iterable[dict], *, max_new_tokens: int = 16, base_dir: str = "") -> dict:
    """Exact-match accuracy of ``pipe.understand`` over items {"image": path or PIL/uint8 image,
    "question", "answer"}. Returns {"accuracy", "n", "predictions": [{question, answer, prediction}]}."""
    predictions, correct = [], 0
    for item in items:
        image = item["image"]
        if isinstance(image, str):
            image = inference.open_image(image if os.path.isabs(image) else os.path.join(base_dir, image))
        prediction = pipe.understand(image, item["question"], max_new_tokens=max_new_tokens)
        ok = normalize_answer(prediction) == normalize_answer(str(item["answer"]))
        correct += ok
        predictions.append({"question": item["question"], "answer": item["answer"], "prediction": prediction,
                            "correct": bool(ok)})
    n = len(predictions)
    return {"accuracy": correct / n if n else 0.0, "n": n, "predictions": predictions}


def define_geneval_flags(fv: flags.FlagValues) -> None:
    cli.define_checkpoint_flags(fv, decoder=True)
    flags.DEFINE_string("prompts", None, "GenEval evaluation_metadata.jsonl", required=True, flag_values=fv)
    flags.DEFINE_string("out", None, "output folder (OUT/00000/samples/0000.png, ...)", required=True, flag_values=fv)
    flags.DEFINE_integer("n-samples", 4, "images per prompt", flag_values=fv)
    cli.define_generation_flags(fv)
    flags.DEFINE_integer("start", 0, "first prompt index", flag_values=fv)
    flags.DEFINE_integer("end", None, "prompt index to stop before (default: all)", flag_values=fv)


def define_vqa_flags(fv: flags.FlagValues) -> None:
    cli.define_checkpoint_flags(fv)
    flags.DEFINE_string("data", None, "jsonl: image, question, answer", required=True, flag_values=fv)
    flags.DEFINE_integer("max-new-tokens", 16, "answer length limit in tokens", flag_values=fv)
    flags.DEFINE_string("predictions-out", None, "write every prediction as jsonl", flag_values=fv)
    cli.define_understanding_flags(fv, jpeg_default=EVAL_JPEG_QUALITY,
                                   pixels_default=f"lmms-eval's {qip.EVAL_MIN_PIXELS} / {qip.EVAL_MAX_PIXELS}")


TASKS = {"geneval": define_geneval_flags, "vqa": define_vqa_flags}


def main(argv=None) -> dict:
    """``argv``: the task (geneval or vqa) first, then its flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    task = argv[0] if argv else None
    if task not in TASKS:
        if task in cli.HELP_ARGS:
            print(f"{__doc__.strip()}\n\nPass geneval --help or vqa --help for the flags.")
            raise SystemExit(0)
        raise app.UsageError(f"the first argument is the task, one of {sorted(TASKS)}; got {task!r}")
    args = cli.parse(argv[1:], TASKS[task], __doc__)
    start = time.time()
    common = dict(mesh=inference.inference_mesh(args.devices), **cli.checkpoint_kwargs(args))
    if task == "geneval":
        pipe = inference.Pipeline.from_checkpoint(args.checkpoint, **common)
        pipe.require_decoder()
        print(f"DiT schedule: {pipe.flow_source}", file=sys.stderr)
        metadata = read_jsonl(args.prompts)
        folders = geneval(pipe, metadata, args.out, n_samples=args.n_samples, seed=args.seed, num_steps=args.steps,
                          guidance=args.guidance, decoder_steps=args.decoder_steps,
                          decoder_guidance=args.decoder_guidance, size=args.size, start=args.start, end=args.end)
        result = {"prompts": len(folders), "n_samples": args.n_samples, "out": args.out,
                  "seconds": time.time() - start}
    else:
        pipe = inference.Pipeline.from_checkpoint(
            args.checkpoint, load_decoder_weights=False, **common,
            **cli.understanding_kwargs(args, qip.EVAL_MIN_PIXELS, qip.EVAL_MAX_PIXELS))
        result = vqa_accuracy(pipe, read_jsonl(args.data), max_new_tokens=args.max_new_tokens,
                              base_dir=os.path.dirname(os.path.abspath(args.data)))
        if args.predictions_out:
            with open(args.predictions_out, "w") as f:
                for row in result["predictions"]:
                    f.write(json.dumps(row) + "\n")
        result = {"accuracy": result["accuracy"], "n": result["n"], "seconds": time.time() - start}
    print(json.dumps(result))
    return result


def run() -> None:
    """``python -m blip3o_jax.eval`` and the ``blip3o-eval`` console script."""
    cli.run(main, own_flags=True)


if __name__ == "__main__":
    run()
