"""``python -m blip3o_jax.generate``: text (or image) -> image (contract section 1; docs/model.md 3.1, 3.3).

    python -m blip3o_jax.generate --checkpoint DIR --prompt "a red circle" --out out.png
    python -m blip3o_jax.generate --checkpoint DIR --prompt A --prompt B --num-images 4 --seed 7 --out out.png
    python -m blip3o_jax.generate --checkpoint DIR --prompt A --features-out feats.npy      # no decoder needed
    python -m blip3o_jax.generate --checkpoint DIR --image in.png --out edit.png [--prompt "<image>\\n..."]
    python -m blip3o_jax.generate --checkpoint DIR --image in.png --autoencode --out rec.png

``--checkpoint``: an Orbax checkpoint of this project (convert output), a PyTorch directory in the
released layout (converted on the fly) or a demo workdir (inference.Pipeline.from_checkpoint).
Prompts are batched (``--batch-size`` images per compiled call); with several output images, FILE.png
becomes FILE_000.png, FILE_001.png, ... (prompt-major: prompt p, sample k -> index p * K + k).
``--image`` conditions the generator on an input image (docs/model.md 3.3a; ``<image>`` in the prompt
marks where it goes, default prompt "<image>\\nPlease reconstruct the given image.");
``--autoencode`` skips the LLM: target encoder -> decoder (docs/model.md 3.3b); ``--resize crop`` (default)
centre-crops the input to a square before resizing it to the encoder's side, as the repository's
``inference.py``; ``--resize squash`` resizes it without keeping the aspect ratio, as
``pipeline_reconstruct.py``. The DiT schedule used (shift, num_train_timesteps) is printed to stderr.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags

from blip3o_jax import cli, inference


def output_paths(out: str, n: int) -> list[str]:
    if n == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i:03d}{ext or '.png'}" for i in range(n)]


def define_flags(fv: flags.FlagValues) -> None:
    cli.define_checkpoint_flags(fv, decoder=True)
    cli.define_generation_flags(fv)
    flags.DEFINE_multi_string("prompt", [], "caption (repeat for several prompts)", flag_values=fv)
    flags.DEFINE_string("prompts-file", None, "one caption per line (added after --prompt)", flag_values=fv)
    flags.DEFINE_string("out", None, "output PNG (FILE_000.png, ... when several images)", flag_values=fv)
    flags.DEFINE_string("features-out", None, "also save the generated target features (B, N, C) as .npy",
                        flag_values=fv)
    flags.DEFINE_integer("num-images", 1, "images per prompt", flag_values=fv)
    flags.DEFINE_integer("batch-size", None, "images per compiled call (default: all)", flag_values=fv)
    flags.DEFINE_multi_string("image", [], "input image (image-conditioned generation; repeatable)", flag_values=fv)
    flags.DEFINE_bool("autoencode", False, "with --image: target encoder -> decoder, no LLM", flag_values=fv)
    flags.DEFINE_enum("resize", "crop", list(inference.RESIZES), "with --autoencode: crop = centre square crop then "
                      "resize (the repository's inference.py), squash = resize ignoring the aspect ratio "
                      "(pipeline_reconstruct.py)", flag_values=fv)
    flags.DEFINE_integer("edit-image-size", 448, "with --image: side the input image is squashed to before the "
                         "Qwen ViT (reference: 448)", flag_values=fv)


def main(argv=None) -> list[str]:
    args = cli.parse(argv, define_flags, __doc__)
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not args.out and not args.features_out:
        raise SystemExit("nothing to write: pass --out FILE.png and/or --features-out FILE.npy")
    if args.autoencode and not args.image:
        raise SystemExit("--autoencode needs --image FILE")
    if args.image and not prompts and not args.autoencode:
        prompts = [inference.EDIT_PROMPT] * len(args.image)
    if args.image and not args.autoencode and len(prompts) != len(args.image):
        if len(prompts) == 1:
            prompts = prompts * len(args.image)
        else:
            raise SystemExit(f"{len(args.image)} images need 1 or {len(args.image)} prompts, got {len(prompts)}")
    if not prompts and not args.autoencode:
        raise SystemExit("pass at least one --prompt (or --image)")

    start = time.time()
    pipe = inference.Pipeline.from_checkpoint(
        args.checkpoint, mesh=inference.inference_mesh(args.devices), **cli.checkpoint_kwargs(args),
        load_decoder_weights=bool(args.out), edit_image_size=args.edit_image_size)
    if args.out:
        pipe.require_decoder()
    images = [inference.open_image(p) for p in args.image] or None
    if not args.autoencode:
        print(f"DiT schedule: {pipe.flow_source}", file=sys.stderr)
    loaded = time.time()
    if args.autoencode:
        feats = pipe.target_features(images, args.resize)
        feats = np.repeat(feats, args.num_images, axis=0)
    else:
        feats = pipe.generate_features(prompts, seed=args.seed, num_steps=args.steps, guidance=args.guidance,
                                       num_images=args.num_images, images=images, batch_size=args.batch_size)
    if args.features_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.features_out)), exist_ok=True)
        np.save(args.features_out, feats)
        print(f"wrote {args.features_out} {feats.shape}")
    paths = []
    if args.out:
        pixels = pipe.decode(feats, seed=args.seed, num_steps=args.decoder_steps, guidance=args.decoder_guidance,
                             size=args.size, batch_size=args.batch_size,
                             negative="zero_image" if args.autoencode else None,
                             negative_steps=args.steps, negative_guidance=args.guidance)
        paths = output_paths(args.out, len(pixels))
        for image, path in zip(pixels, paths):
            inference.save_png(image, path)
            print(f"wrote {path}")
    print(f"{len(feats)} image(s) in {time.time() - loaded:.1f} s (loading {loaded - start:.1f} s)", file=sys.stderr)
    return paths


def run() -> None:
    """``python -m blip3o_jax.generate`` and the ``blip3o-generate`` console script."""
    cli.run(main, own_flags=True)


if __name__ == "__main__":
    run()
