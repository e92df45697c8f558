"""``python -m blip3o_jax.convert``: released PyTorch directory <-> model checkpoint (contract 1-3), and
the public Python entry points of the conversion (``blip3o_jax.conversion`` holds the streaming code).

Python:

    from blip3o_jax.convert import load_torch, save_torch
    model = load_torch("BLIP3o-Model-8B")        # PyTorch / Hugging Face directory -> Blip3o
    save_torch(model, "exported")                  # Blip3o -> the released layout

Command line:

    python -m blip3o_jax.convert --src BLIP3o-Model-8B --dst blip3o_8b_orbax [--dtype bfloat16]
    python -m blip3o_jax.convert --src blip3o_8b_orbax --dst exported --to torch
    python -m blip3o_jax.convert --src WORKDIR --dst exported_ema --to torch --ema   # a stage's EMA weights

The torch -> Orbax direction writes a model checkpoint (``checkpoints.py``: ``DST/params`` +
``DST/config.json``), copies the tokenizer / processor files and converts ``SRC/diffusion-decoder/`` (if
present) to ``DST/diffusion-decoder/``, so ``generate`` / ``understand`` run from DST alone. ``--to
torch`` loads the model checkpoint on the host CPU and writes one tensor at a time.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app

from blip3o_jax import checkpoints, cli, conversion
from blip3o_jax.conversion import load_torch, save_torch

__all__ = ["load_torch", "save_torch", "torch_to_orbax", "orbax_to_torch", "main", "run"]


def torch_to_orbax(src: str | os.PathLike, dst: str | os.PathLike, dtype: Any = "float32", *,
                   allow_pickle: bool = False, group_bytes: int = 256 << 20, progress: bool = True):
    """PyTorch directory -> model checkpoint in ``dst`` (parameters streamed, conversion.torch_to_orbax);
    returns the project config. Written into a folder beside ``dst`` and moved into place only when
    complete (conversion.staged_directory)."""
    return _to_model_checkpoint(src, dst, dtype, allow_pickle=allow_pickle, group_bytes=group_bytes,
                                progress=progress, companions=False)[0]


def _to_model_checkpoint(src, dst, dtype, *, allow_pickle, group_bytes, progress, companions: bool):
    """(project config, companions written): the parameters, config.json and, with ``companions``, the
    tokenizer files and the converted ``diffusion-decoder/`` (checkpoints.copy_companions), all staged."""
    with conversion.staged_directory(dst, checkpoints.CONFIG_FILE) as staging:
        cfg = conversion.torch_to_orbax(src, os.path.join(staging, checkpoints.PARAMS_DIR), dtype,
                                        allow_pickle=allow_pickle, group_bytes=group_bytes, progress=progress)
        extras = checkpoints.copy_companions(os.fspath(src), staging, dtype) if companions else []
        checkpoints.write_config(staging, cfg)
    return cfg, extras


def orbax_to_torch(src: str | os.PathLike, dst: str | os.PathLike, *, max_shard_bytes: int = 2 << 30,
                   dtype: Any | None = None, progress: bool = True, ema: bool = False) -> None:
    """Model checkpoint -> the released PyTorch layout, one tensor at a time (a stacked layer array is
    read one layer slice at a time: conversion.orbax_to_torch), written beside ``dst`` and moved into
    place when complete. ``ema``: the trained parameters from ``SRC/params_ema/`` (a training stage's
    EMA), the others from ``SRC/params/``."""
    src = checkpoints.model_dir(src)
    cfg = checkpoints.read_config(src)
    overlay = None
    if ema:
        if not checkpoints.has_ema(src):
            raise checkpoints.CheckpointError(f"--ema: {src} has no {checkpoints.PARAMS_EMA_DIR}/ (a training stage "
                                              "writes one when train.ema_decay > 0)")
        overlay = os.path.join(src, checkpoints.PARAMS_EMA_DIR)
    with conversion.staged_directory(dst, "config.json") as staging:
        conversion.orbax_to_torch(os.path.join(src, checkpoints.PARAMS_DIR), cfg, staging,
                                  max_shard_bytes=max_shard_bytes, dtype=dtype, progress=progress, overlay_dir=overlay)


def main(argv=None) -> None:
    args = cli.parse(argv, cli.define_convert_flags, __doc__)
    if args.to == "torch":
        orbax_to_torch(args.src, args.dst, max_shard_bytes=args.max_shard_bytes, dtype=args.dtype, ema=args.ema)
    elif args.ema:
        raise app.UsageError("--ema applies to --to torch (a PyTorch directory has no EMA weights)")
    else:
        cfg, extras = _to_model_checkpoint(args.src, args.dst, args.dtype or "float32",
                                           allow_pickle=args.allow_pickle, group_bytes=args.group_bytes,
                                           progress=True, companions=True)
        print(f"wrote {args.dst}/params (model {cfg.model.dtype}, target encoder: {cfg.model.target_encoder})")
        if extras:
            print(f"copied/converted beside it: {', '.join(extras)}")
        if not os.path.isdir(os.path.join(args.src, checkpoints.DECODER_DIR)):
            print(f"note: {args.src} has no diffusion-decoder/: generate can only write --features-out")
        return
    print(f"wrote {args.dst} (released PyTorch layout)")


def run() -> None:
    """``python -m blip3o_jax.convert`` and the ``blip3o-convert`` console script."""
    cli.run(main, own_flags=True)


if __name__ == "__main__":
    run()
