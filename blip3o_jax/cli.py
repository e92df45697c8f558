"""What every ``python -m blip3o_jax.X`` command shares: absl flags, the shared flag sets, ``run``.

Two kinds of command:

* config commands (train, precompute, plan) keep their flags on absl's global ``FLAGS``, because
  ml_collections' ``--config`` and its ``--config.KEY=VALUE`` overrides live there; ``run(main)`` is
  ``absl.app.run(main)``.
* checkpoint commands (generate, understand, eval, convert) parse into a ``FlagValues`` of their own on
  every call (``parse``): ``main(argv)`` then also works in-process, several commands in one process,
  each call starting from the defaults (argv lists without the program name, as ``sys.argv[1:]``);
  ``run(main, own_flags=True)``.

absl matches a flag name exactly (no dash/underscore folding as in C++ gflags), so each dashed flag
(``--num-images``, the documented spelling) also gets its underscore spelling (``--num_images``) as an
absl alias. ``--help`` (``-h``, ``--helpshort``) prints the module docstring and the command's own
flags to stdout and exits 0 (absl's exits 1 and lists only the main module's flags).

This module imports no project module, so every command's start-up stays light (no jax, no torch).
"""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from collections.abc import Callable, Iterable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

HELP_ARGS = frozenset({"-h", "--help", "--helpshort", "--helpfull"})
NEGATIVES = ("space_prompt", "empty_prompt", "zero_image")  # = inference.NEGATIVES (no project imports here)
DTYPES = ("float32", "bfloat16", "float16")
# --dtype presets of the checkpoint commands (inference.DTYPE_PRESETS holds what each one sets):
# "released" = the released BLIP3-o pipeline's casts (LLM + DiT float16, decoder UNet + VAE bfloat16).
DTYPE_PRESETS = ("released",)


# ---------------------------------------------------------------------------------------------
# Shared flag sets of the checkpoint commands


def define_checkpoint_flags(fv: flags.FlagValues, *, decoder: bool = False) -> None:
    """What loads an ``inference.Pipeline``: see ``checkpoint_kwargs``."""
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint, PyTorch directory or demo workdir", required=True,
                        flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "tokenizer folder or tokenizer.json (default: the checkpoint's)",
                        flag_values=fv)
    flags.DEFINE_enum("dtype", None, DTYPES + DTYPE_PRESETS, "parameter/compute dtype of every model (default: "
                      "the stored one, float32 from PyTorch); 'released' = the released pipeline's casts: LLM, DiT "
                      "and target encoder float16, decoder UNet + VAE bfloat16, sampler latents rounded to the "
                      "model's dtype after each float32 Euler step", flag_values=fv)
    flags.DEFINE_integer("devices", None, "use the first N devices (default: all)", flag_values=fv)
    flags.DEFINE_bool("ema", False, "load the EMA weights of the trained parameters (the checkpoint's params_ema/, "
                      "written by a training stage with train.ema_decay > 0)", flag_values=fv)
    if decoder:
        flags.DEFINE_string("decoder", None, "decoder folder (diffusers diffusion-decoder/ or converted) overriding "
                            "the one found", flag_values=fv)
        flags.DEFINE_enum("negative", None, NEGATIVES, "decoder negative features: space_prompt = the released "
                          "pipeline's generate_image(text=[' ']), empty_prompt = marker + queries only, zero_image "
                          "= target features of an all-zero image (default: the checkpoint's pipeline.json, e.g. "
                          "zero_image for demo workdirs, else space_prompt)", flag_values=fv)
        flags.DEFINE_string("dit-scheduler", None, "FlowMatchEulerDiscreteScheduler scheduler_config.json (or its "
                            "folder) for the DiT sampler's shift / num_train_timesteps (default: the checkpoint's "
                            "scheduler/scheduler_config.json if present, else the model config's flow section)",
                            flag_values=fv)


def checkpoint_kwargs(args: types.SimpleNamespace) -> dict:
    """``inference.Pipeline.from_checkpoint`` keywords from ``define_checkpoint_flags``'s flags (the mesh
    for ``args.devices`` is the caller's: this module does not import jax)."""
    names = ("tokenizer", "dtype", "decoder", "negative", "dit_scheduler", "ema")
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def define_understanding_flags(fv: flags.FlagValues, *, jpeg_default: int | None = None,
                               pixels_default: str = "the checkpoint's preprocessor_config.json, else the "
                               "processor's 3136 / 12845056") -> None:
    """Image + question -> text: processor limits, JPEG round trip, generation_config.json use."""
    flags.DEFINE_integer("min-pixels", None, f"processor minimum pixels (default: {pixels_default})", flag_values=fv)
    flags.DEFINE_integer("max-pixels", None, f"processor maximum pixels (default: {pixels_default})", flag_values=fv)
    flags.DEFINE_integer("jpeg-quality", jpeg_default, "re-encode each image as JPEG at this quality before the "
                         "processor, as the official lmms-eval class does (it saves with PIL's default quality, "
                         "75); 0 = no round trip", lower_bound=0, upper_bound=100, flag_values=fv)
    flags.DEFINE_float("repetition-penalty", None, "transformers' repetition penalty (default: the checkpoint's "
                       "generation_config.json, else 1.0 = off)", flag_values=fv)
    flags.DEFINE_bool("generation-config", True, "apply the checkpoint's generation_config.json (repetition_penalty, "
                      "eos ids; decoding stays greedy unless --temperature > 0); --nogeneration-config ignores it",
                      flag_values=fv)


def understanding_kwargs(args: types.SimpleNamespace, min_pixels: int | None = None,
                         max_pixels: int | None = None) -> dict:
    """``Pipeline.from_checkpoint`` keywords of ``define_understanding_flags`` (``min_pixels`` /
    ``max_pixels``: the command's own defaults, None = the checkpoint's)."""
    return dict(min_pixels=args.min_pixels or min_pixels, max_pixels=args.max_pixels or max_pixels,
                jpeg_quality=args.jpeg_quality or None, repetition_penalty=args.repetition_penalty,
                generation_config=args.generation_config)


def define_generation_flags(fv: flags.FlagValues) -> None:
    """Text -> image sampling: the DiT's Euler loop, then the pixel decoder's."""
    flags.DEFINE_integer("seed", 0, "noise seed", flag_values=fv)
    flags.DEFINE_integer("steps", 30, "DiT Euler steps", flag_values=fv)
    flags.DEFINE_float("guidance", 3.0, "DiT classifier-free guidance", flag_values=fv)
    flags.DEFINE_integer("decoder-steps", 50, "pixel decoder steps", flag_values=fv)
    flags.DEFINE_float("decoder-guidance", 3.0, "pixel decoder classifier-free guidance", flag_values=fv)
    flags.DEFINE_integer("size", None, "image side in pixels (default: the decoder's native)", flag_values=fv)


def define_convert_flags(fv: flags.FlagValues) -> None:
    """``python -m blip3o_jax.convert``'s flags (convert.main)."""
    flags.DEFINE_string("src", None, "PyTorch directory (default) or Orbax checkpoint (--to torch)", required=True,
                        flag_values=fv)
    flags.DEFINE_string("dst", None, "output directory", required=True, flag_values=fv)
    flags.DEFINE_enum("to", "orbax", ("orbax", "torch"), "output format", flag_values=fv)
    flags.DEFINE_bool("allow-pickle", False, "accept pickle pytorch_model*.bin files", flag_values=fv)
    flags.DEFINE_enum("dtype", None, DTYPES, "parameter dtype (default float32 from PyTorch, the stored one from "
                      "Orbax)", flag_values=fv)
    flags.DEFINE_integer("max-shard-bytes", 2 << 30, "safetensors shard size (--to torch)", flag_values=fv)
    flags.DEFINE_bool("ema", False, "--to torch: export the EMA weights of the trained parameters (SRC's params_ema/, "
                      "written by a training stage with train.ema_decay > 0) instead of params/", flag_values=fv)
    flags.DEFINE_integer("group-bytes", 256 << 20, "parameters written per Orbax partial save (host memory vs. "
                         "number of writes)", flag_values=fv)


# ---------------------------------------------------------------------------------------------
# Shared flags of the config commands (absl's global FLAGS)


def define_config_flag(example: str) -> None:
    config_flags.DEFINE_config_file("config", None, f"Config file, e.g. {example}.")


def define_distributed_flag() -> None:
    flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize(); default: only when a multi-process "
                      "environment (TPU pod/VM, SLURM with >1 task, JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + "
                      "JAX_PROCESS_ID) is detected (blip3o_jax.distributed).")


def setup_logging() -> None:
    """Our progress lines (logging.info) to stdout; absl/Orbax/JAX chatter only from WARNING up."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout, force=True)
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Parsing and running


def parse(argv: Sequence[str] | None, define: Callable[[flags.FlagValues], None], doc: str | None = None
          ) -> types.SimpleNamespace:
    """Parses ``argv`` (default ``sys.argv[1:]``) with the flags ``define`` adds to a fresh FlagValues;
    returns their values by name, dashes as underscores (``args.num_images``). ``--help`` prints ``doc``
    and the flags and exits 0; a bad, missing or unknown flag raises ``absl.app.UsageError``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = flags.FlagValues()
    define(fv)
    names = list(fv)  # before the aliases
    for name in names:
        if "-" in name:
            flags.DEFINE_alias(name.replace("-", "_"), name, flag_values=fv)
    if HELP_ARGS & set(argv):
        print(help_text(doc, (fv[name] for name in names)))
        raise SystemExit(0)
    try:
        rest = fv(["prog", *argv])[1:]
    except flags.Error as e:
        raise app.UsageError(str(e)) from None
    if rest:
        raise app.UsageError(f"unexpected arguments {rest} (every input is a --flag)")
    return types.SimpleNamespace(**{name.replace("-", "_"): fv[name].value for name in names})


def help_text(doc: str | None, flag_list: Iterable[flags.Flag]) -> str:
    lines = [textwrap.dedent(doc or "").strip(), "", "flags:"]
    for flag in flag_list:
        name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
        if "-" in flag.name:
            name += f" (or --{flag.name.replace('-', '_')})"
        text = " ".join(flag.help.split())  # absl appends its own multi-line notes (repeatable flags)
        if any("must have a value other than None" in getattr(v, "message", "") for v in flag.validators):
            text += " (required)"
        elif flag.default not in (None, [], "") and not (flag.boolean and flag.default is False):
            text += f" (default: {flag.default})"
        lines += textwrap.wrap(f"{name}: {text}", width=100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def run(main: Callable[[list[str]], object], *, own_flags: bool = False) -> None:
    """``absl.app.run`` for this project's commands: ``--help`` exits 0 (see the module docstring),
    a ``UsageError`` (bad flag, config key or value) prints one line to stderr and exits 1, absl's INFO
    chatter (Orbax, JAX) is off, and ``main``'s return value is not taken for an exit status.

    ``own_flags``: ``main(argv)`` parses ``sys.argv[1:]`` itself (``parse``); otherwise ``main`` is an
    absl main over the global FLAGS."""
    module = sys.modules[main.__module__]
    prog = getattr(module.__spec__, "name", None) or sys.argv[0]
    if not own_flags and (HELP_ARGS - {"--helpfull"}) & set(sys.argv[1:]):  # --helpfull: absl's
        by_module = flags.FLAGS.flags_by_module_dict()
        print(help_text(module.__doc__, (f for name, fs in by_module.items() if "blip3o_jax" in name for f in fs)))
        raise SystemExit(0)

    def entry(argv: list[str]) -> None:
        absl_logging.set_verbosity(absl_logging.WARNING)  # app.run has just raised it to INFO
        try:
            main(argv[1:] if own_flags else argv)
        except app.UsageError as e:
            sys.stderr.write(f"{prog}: {e}\nPass --help to see the flags.\n")
            sys.exit(1)

    # own_flags: absl's global FLAGS (its own flags: logging, pdb, ...) keep their defaults.
    parser = (lambda argv: flags.FLAGS.mark_as_parsed() or argv) if own_flags else app.parse_flags_with_usage
    app.run(entry, flags_parser=parser)
