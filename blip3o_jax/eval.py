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
reference after normalisation (surrounding whitespace, case and one trailing period ignored).

Both are plain functions of an ``inference.Pipeline`` (``geneval``, ``vqa_accuracy``) so other code
(the demo report) uses the same paths.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable, Sequence


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows


def geneval(pipe, metadata: Sequence[dict], out_dir: str, *, n_samples: int = 4, seed: int = 0, num_steps: int = 30,
            guidance: float = 3.0, decoder_steps: int = 50, decoder_guidance: float = 3.0, size: int | None = None,
            start: int = 0, end: int | None = None, skip_existing: bool = True) -> list[str]:
    """Writes OUT/{index:05d}/metadata.jsonl + samples/{k:04d}.png for prompts [start, end); returns
    the folders written. Every prompt's n_samples images are one batch (one compilation overall)."""
    from blip3o_jax import inference

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
    from blip3o_jax import inference

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m blip3o_jax.eval", description="BLIP3-o evaluation")
    sub = p.add_subparsers(dest="task", required=True)
    for name in ("geneval", "vqa"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", required=True, help="Orbax checkpoint, PyTorch directory or demo workdir")
        s.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the checkpoint's)")
        s.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
        s.add_argument("--devices", type=int, default=None)
    g = sub.choices["geneval"]
    g.add_argument("--prompts", required=True, help="GenEval evaluation_metadata.jsonl")
    g.add_argument("--out", required=True)
    g.add_argument("--n-samples", type=int, default=4)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=3.0)
    g.add_argument("--decoder-steps", type=int, default=50)
    g.add_argument("--decoder-guidance", type=float, default=3.0)
    g.add_argument("--size", type=int, default=None)
    g.add_argument("--decoder", help="decoder folder overriding the checkpoint's")
    g.add_argument("--negative", choices=("empty_prompt", "zero_image"), default=None)
    g.add_argument("--start", type=int, default=0)
    g.add_argument("--end", type=int, default=None)
    v = sub.choices["vqa"]
    v.add_argument("--data", required=True, help="jsonl: image, question, answer")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--predictions-out", help="write every prediction as jsonl")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from blip3o_jax import inference

    start = time.time()
    common = dict(tokenizer=args.tokenizer, dtype=args.dtype, mesh=inference.inference_mesh(args.devices))
    if args.task == "geneval":
        pipe = inference.Pipeline.from_checkpoint(args.checkpoint, decoder=args.decoder, negative=args.negative,
                                                  **common)
        pipe.require_decoder()
        metadata = read_jsonl(args.prompts)
        folders = geneval(pipe, metadata, args.out, n_samples=args.n_samples, seed=args.seed, num_steps=args.steps,
                          guidance=args.guidance, decoder_steps=args.decoder_steps,
                          decoder_guidance=args.decoder_guidance, size=args.size, start=args.start, end=args.end)
        result = {"prompts": len(folders), "n_samples": args.n_samples, "out": args.out,
                  "seconds": time.time() - start}
    else:
        pipe = inference.Pipeline.from_checkpoint(args.checkpoint, load_decoder_weights=False, **common)
        result = vqa_accuracy(pipe, read_jsonl(args.data), max_new_tokens=args.max_new_tokens,
                              base_dir=os.path.dirname(os.path.abspath(args.data)))
        if args.predictions_out:
            with open(args.predictions_out, "w") as f:
                for row in result["predictions"]:
                    f.write(json.dumps(row) + "\n")
        result = {"accuracy": result["accuracy"], "n": result["n"], "seconds": time.time() - start}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
