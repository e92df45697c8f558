"""Every directory layout this project reads or writes, in one place.

**A model checkpoint** (what ``convert`` writes, what a finished training stage leaves in
``WORKDIR/params``, what the demo leaves in its WORKDIR; ``generate / understand / eval --checkpoint``
and ``train.init_from`` read it)::

    DIR/config.json          the project config (configlib schema, as a dict)
    DIR/params/              the Orbax parameter tree (nested dict, ``backbone/model/...``)
    DIR/params_ema/          optional: the EMA of the parameters a stage trained (train.ema_decay > 0),
                             the same paths, only the trained ones; ``--ema`` / train.init_from_ema
                             read them from here and everything else from params/ (restore_params)
    DIR/tokenizer.json ...   optional: the tokenizer / processor files (TOKENIZER_FILES)
    DIR/diffusion-decoder/   optional: the pixel decoder, Orbax form (params/ + config.json) or the
                             released diffusers form (unet/ vae/ scheduler/)
    DIR/pipeline.json        optional: the checkpoint's inference defaults (decoder negative, image
                             sizes of the understanding path), read by ``inference.Pipeline``
    DIR/generation_config.json  optional (transformers'): repetition_penalty + eos ids of understanding
    DIR/scheduler/scheduler_config.json  optional: the DiT sampler's FlowMatchEulerDiscreteScheduler
                             config (shift, num_train_timesteps; read_dit_scheduler). Not
                             diffusion-decoder/scheduler/, which is the pixel decoder's.

**A PyTorch directory** in the released layout (contract 3) is read through ``blip3o_jax.conversion``
wherever a model checkpoint is accepted: ``config.json`` + safetensors, tokenizer files and
``diffusion-decoder/`` beside them.

**A training run's WORKDIR**: ``checkpoints/`` (RunCheckpointer: trainable parameters, optimizer state,
step, RNG and, with train.ema_decay > 0, their EMA as one pytree, the data-iterator state and the config as JSON, saved asynchronously every
``checkpoint_every`` steps, keeping the newest ``keep_checkpoints``) and, when finished, ``params/``
(a model checkpoint). A SIGTERM (or JAX's preemption notice on TPU/GPU clusters) makes the run save at
the next step boundary and exit cleanly; restarting the same command resumes from the newest
checkpoint. Restores go through abstract arrays that carry the *current* run's shardings, so a
checkpoint written on one mesh restores onto any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from blip3o_jax import configlib, conversion, sharding
from blip3o_jax.decoder import mapping as decoder_mapping
from blip3o_jax.decoder import scheduler as sched_lib
from blip3o_jax.decoder.pixel_decoder import Decoder
from blip3o_jax.decoder.unet import UNet2DConditionModel, UNetConfig
from blip3o_jax.decoder.vae import AutoencoderKL, VAEConfig
from blip3o_jax.models import blip3o as model_lib
from blip3o_jax.weights import CheckpointMismatchError

PARAMS_DIR = "params"
PARAMS_EMA_DIR = "params_ema"
CONFIG_FILE = "config.json"
DECODER_DIR = "diffusion-decoder"
PIPELINE_FILE = "pipeline.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
                   "preprocessor_config.json")
DIT_SCHEDULER_FILE = os.path.join("scheduler", "scheduler_config.json")
GENERATION_CONFIG_FILE = "generation_config.json"
# FlowMatchEulerDiscreteScheduler fields (diffusers 0.42) and the value at which each leaves this project's
# sampler (models/flow.py: static shift, linspace sigmas, Euler) unchanged. base_shift .. max_image_seq_len
# only act with use_dynamic_shifting, so any value is accepted while that is False.
_FLOW_SCHEDULER_INERT = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                         "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                         "stochastic_sampling": False}
_FLOW_SCHEDULER_DYNAMIC_ONLY = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len",
                                "time_shift_type")
# What pipeline.json may hold (inference.Pipeline keyword arguments).
PIPELINE_KEYS = ("negative", "und_image_size", "min_pixels", "max_pixels")


class CheckpointError(ValueError):
    """A checkpoint directory misses something a requested path needs (the message says what to do)."""


class PreemptionWatcher:
    """Turns SIGTERM into a flag the training loop polls at step boundaries (one process).

    With several processes the handler is left to JAX's preemption service (jax.distributed), which
    catches SIGTERM on any process and makes all of them stop at the same step
    (``RunCheckpointer.reached_preemption``); a per-process flag could stop them at different steps,
    and the one still stepping would wait forever in a collective.
    """

    def __init__(self):
        self._event = threading.Event()
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def requested(self) -> bool:
        return self._event.is_set()


class RunCheckpointer:
    def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force)

    def should_save(self, step: int) -> bool:
        return self.manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by ``abstract_state`` (jax.ShapeDtypeStruct leaves)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_params(path: str, params: Any, config: dict | None = None, ema: Any = None) -> None:
    """A standalone parameter checkpoint (the output of ``blip3o_jax.convert`` and of a finished stage):
    ``path/params`` holds the model's parameters as a plain nested dict (``backbone/model/...``);
    ``ema`` (the moving average of the trained subset, same paths) goes to ``path/params_ema``."""
    path = os.path.abspath(path)
    trees = {PARAMS_DIR: params} if ema is None else {PARAMS_DIR: params, PARAMS_EMA_DIR: ema}
    for name, tree in trees.items():
        if isinstance(tree, nnx.State):
            tree = nnx.to_pure_dict(tree)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(path, name), tree, force=True)
    if config is not None:
        write_config(path, config)


def has_ema(path: str | os.PathLike) -> bool:
    return os.path.isdir(os.path.join(model_dir(path), PARAMS_EMA_DIR))


def restore_params(path: str, abstract_params: Any, ema: bool = False) -> Any:
    """Restores onto the shardings of ``abstract_params`` (an abstract nnx.State or a plain dict).

    The checkpoint may hold more than the target: e.g. one with the EVA target encoder restores into a
    model built with ``model.target_encoder='none'`` (training on precomputed features); only the target's
    keys are read. A key the target needs but the checkpoint lacks, or a shape that differs, raises
    ``weights.CheckpointMismatchError`` naming every such key. ``ema``: the arrays ``path/params_ema``
    holds come from there (the EMA weights of a stage's trained parameters), the rest from ``path/params``.
    """
    path = os.path.abspath(path)
    state = abstract_params if isinstance(abstract_params, nnx.State) else None
    like = nnx.to_pure_dict(state) if state is not None else abstract_params
    # Orbax stores dict keys as strings; list-like NNX containers have integer keys.
    target = _string_keys(like)
    if ema:
        ema_dir = os.path.join(path, PARAMS_EMA_DIR)
        if not os.path.isdir(ema_dir):
            raise CheckpointError(f"{path} has no {PARAMS_EMA_DIR}/ (a finished training stage writes one when "
                                  "train.ema_decay > 0); drop --ema / train.init_from_ema to use its params/")
        with ocp.StandardCheckpointer() as ckptr:
            averaged = set(_flat_shapes(ckptr.metadata(ema_dir).item_metadata.tree))
        from_ema, rest = _split_tree(target, averaged)
        restored = _restore_tree(ema_dir, from_ema)
        if rest:
            restored = _merge_trees(restored, _restore_tree(os.path.join(path, PARAMS_DIR), rest))
    else:
        restored = _restore_tree(os.path.join(path, PARAMS_DIR), target)
    restored = _keys_like(restored, like)
    if state is None:
        return restored
    nnx.replace_by_pure_dict(state, restored)
    return state


def _restore_tree(path: str, target: dict) -> dict:
    """One Orbax tree of ``path`` onto ``target`` (string keys), which may be a subset of what is stored."""
    with ocp.StandardCheckpointer() as ckptr:
        stored = _flat_shapes(ckptr.metadata(path).item_metadata.tree)
    wanted = _flat_shapes(target)
    missing = [(k, shape) for k, shape in wanted.items() if k not in stored]
    mismatched = [(k, stored[k], shape) for k, shape in wanted.items() if k in stored and stored[k] != shape]
    if missing or mismatched:
        raise CheckpointMismatchError(missing, (), mismatched, where=path)
    if stored.keys() == wanted.keys():
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, target)
    else:
        logging.info("%s: restoring %d of %d stored arrays (the rest is not part of this model)", path,
                     len(wanted), len(stored))
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(path, args=args)
    return restored


def _split_tree(tree: dict, keys: set[str], prefix: str = "") -> tuple[dict, dict]:
    """(the leaves of ``tree`` whose 'a/b/c' path is in ``keys``, the others), both nested like ``tree``."""
    inside, outside = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            a, b = _split_tree(v, keys, f"{prefix}{k}/")
            if a:
                inside[k] = a
            if b:
                outside[k] = b
        else:
            (inside if f"{prefix}{k}" in keys else outside)[k] = v
    return inside, outside


def _merge_trees(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_trees(out[k], v) if k in out else v
    return out


def _flat_shapes(tree: Any, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{'backbone/model/...': shape} of a nested dict of arrays, abstract arrays or Orbax metadata."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_shapes(v, f"{prefix}{k}/"))
        return out
    return {prefix[:-1]: tuple(getattr(tree, "shape", ()))}


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _keys_like(tree: Any, like: Any) -> Any:
    if isinstance(like, dict):
        return {k: _keys_like(tree[str(k)], v) for k, v in like.items()}
    return tree


# ---------------------------------------------------------------------------------------------
# Model checkpoints


def is_model_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.exists(os.path.join(path, CONFIG_FILE))


def model_dir(path: str | os.PathLike) -> str:
    """``path`` itself, or ``path/params`` for a finished training run's WORKDIR (whose ``params/`` holds
    a ``params/`` tree of its own)."""
    path = os.path.abspath(os.fspath(path))
    inner = os.path.join(path, PARAMS_DIR)
    return inner if os.path.isdir(os.path.join(inner, PARAMS_DIR)) else path


def write_config(path: str, config: dict | ml_collections.ConfigDict) -> None:
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=1)


def read_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The project config of a model checkpoint, or of a PyTorch directory (from its config.json)."""
    path = model_dir(path)
    if is_model_checkpoint(path):
        with open(os.path.join(path, CONFIG_FILE)) as f:
            return configlib.from_dict(json.load(f))
    return conversion.TorchDirectory(path).config()


def save_model(path: str, model: nnx.Module, config: ml_collections.ConfigDict | dict) -> None:
    """A model checkpoint of ``model`` (every parameter) with its project config."""
    save_params(path, nnx.state(model, nnx.Param), config.to_dict() if hasattr(config, "to_dict") else config)


def load_model(path: str | os.PathLike, dtype: Any | None = None, mesh: jax.sharding.Mesh | None = None, *,
               allow_pickle: bool = False, progress: bool = False, ema: bool = False
               ) -> tuple[model_lib.Blip3o, ml_collections.ConfigDict]:
    """(``Blip3o``, its project config) from a model checkpoint (or a finished run's WORKDIR) or a
    PyTorch directory (converted on the fly). ``dtype`` None keeps the stored parameter dtype (float32
    for PyTorch directories). ``ema``: the trained parameters' EMA weights (``params_ema/``)."""
    path = model_dir(path)
    mesh = mesh or conversion.default_mesh()
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if ema and not is_model_checkpoint(path):
        raise CheckpointError(f"{path}: EMA weights (--ema) exist only in model checkpoints of this project "
                              f"(a finished training stage's {PARAMS_EMA_DIR}/), not in a PyTorch directory")
    if not is_model_checkpoint(path):
        model = conversion.load_torch(path, jnp.float32 if dtype is None else dtype, mesh, allow_pickle=allow_pickle,
                                      progress=progress)
        cfg = conversion.TorchDirectory(path, allow_pickle=allow_pickle).config(
            model.cfg.param_dtype, model.cfg.target_encoder != "none")
        return model, cfg
    cfg = read_config(path)
    # The config's own ids against its vocabulary (abstract_model checks too; this names the file).
    model_lib.check_config_token_ids(cfg, source=os.path.join(path, CONFIG_FILE))
    if dtype is not None:
        cfg.model.dtype = cfg.model.param_dtype = jnp.dtype(dtype).name
    graphdef, abstract = model_lib.abstract_model(cfg, mesh)
    return nnx.merge(graphdef, restore_params(path, abstract, ema=ema)), cfg


def restore_into(model: model_lib.Blip3o, path: str | os.PathLike, ema: bool = False) -> None:
    """Parameter-only initialisation in place (``train.init_from``) from a model checkpoint, a finished
    run's WORKDIR or a PyTorch directory: arrays land in the shardings and dtypes the model already has.
    ``ema`` (``train.init_from_ema``): the EMA weights where the checkpoint has them (restore_params).

    A checkpoint of another generation head (its config.json names another ``model.gen_head`` /
    ``model.denoiser``, e.g. the released DiT for a model that tries a new denoiser) initialises
    everything but the head, which keeps its initialisation (logged)."""
    path = model_dir(path)
    if not os.path.isdir(os.path.join(path, PARAMS_DIR)):
        if ema:
            raise CheckpointError(f"train.init_from_ema: {path} is not a model checkpoint of this project, so it "
                                  f"has no {PARAMS_EMA_DIR}/")
        conversion.load_into(model, path)
        return
    state = nnx.state(model, nnx.Param)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    stored = read_config(path).model if os.path.exists(os.path.join(path, CONFIG_FILE)) else None
    if stored is None or (stored.gen_head, stored.denoiser) == (model.cfg.gen_head, model.cfg.denoiser):
        nnx.update(model, restore_params(path, abstract, ema=ema))  # a parameter tree needs no config to restore into
        return
    logging.warning("%s holds a %s/%s generation head; this model's %s/%s head keeps its initialisation", path,
                    stored.gen_head, stored.denoiser, model.cfg.gen_head, model.cfg.denoiser)
    target = nnx.to_pure_dict(abstract)
    target.pop("gen_head")
    restored = restore_params(path, target, ema=ema)
    restored["gen_head"] = nnx.to_pure_dict(state)["gen_head"]
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)


# ---------------------------------------------------------------------------------------------
# Tokenizer and inference defaults


def has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(path: str):
    """A tokenizer.json file, or a folder with the Hugging Face tokenizer files (local only)."""
    # Deliberately lazy: transformers costs seconds to import and is needed only when text is tokenized.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if os.path.isfile(path):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    if not has_tokenizer(path):
        raise CheckpointError(
            f"no tokenizer in {path}: copy the checkpoint's tokenizer files (tokenizer.json, "
            "tokenizer_config.json, ...) there (python -m blip3o_jax.convert does) or pass --tokenizer PATH")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copies the tokenizer / processor files of ``src`` (those present) into ``dst``."""
    done = []
    os.makedirs(dst, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
            done.append(name)
    return done


def write_pipeline_defaults(path: str, **values) -> None:
    unknown = set(values) - set(PIPELINE_KEYS)
    if unknown:
        raise ValueError(f"{PIPELINE_FILE}: unknown keys {sorted(unknown)}; allowed: {list(PIPELINE_KEYS)}")
    if jax.process_index() == 0:
        with open(os.path.join(path, PIPELINE_FILE), "w") as f:
            json.dump(values, f, indent=1)


def pipeline_defaults(path: str) -> dict:
    """The checkpoint's inference defaults: ``pipeline.json`` if present, and the image processor's pixel
    limits from a ``preprocessor_config.json`` (Qwen2.5-VL processor names)."""
    out: dict = {}
    pre_file = os.path.join(path, "preprocessor_config.json")
    if os.path.exists(pre_file):
        with open(pre_file) as f:
            pre = json.load(f)
        size = pre.get("size") or {}
        for key, alt in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if pre.get(key) or size.get(alt):
                out[key] = int(pre.get(key) or size.get(alt))
    file = os.path.join(path, PIPELINE_FILE)
    if os.path.exists(file):
        with open(file) as f:
            values = json.load(f)
        unknown = set(values) - set(PIPELINE_KEYS)
        if unknown:
            raise CheckpointError(f"{file}: unknown keys {sorted(unknown)}; allowed: {list(PIPELINE_KEYS)}")
        out.update(values)
    return out


def generation_defaults(path: str) -> dict:
    """``repetition_penalty`` and ``eos_token_ids`` of the checkpoint's ``generation_config.json`` (the
    transformers file Qwen2.5-VL ships: repetition_penalty 1.05, eos [151645, 151643]); {} without one.
    Its sampling fields (do_sample, temperature, top_p, top_k) are not taken: understanding stays greedy
    unless a temperature is asked for (contract section 1)."""
    file = os.path.join(path, GENERATION_CONFIG_FILE)
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        values = json.load(f)
    out: dict = {}
    if values.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(values["repetition_penalty"])
    eos = values.get("eos_token_id")
    if eos is not None:
        out["eos_token_ids"] = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    return out


def dit_scheduler_file(path: str) -> str | None:
    """``DIR/scheduler/scheduler_config.json`` of a checkpoint root if present (the DiT's; the official
    code loads Lumina-Next-SFT's from the hub), else None."""
    file = os.path.join(path, DIT_SCHEDULER_FILE)
    return file if os.path.isfile(file) else None


def read_dit_scheduler(path: str) -> dict:
    """The DiT sampler's ``{shift, num_train_timesteps}`` (models/flow.py FlowConfig fields) from a diffusers
    FlowMatchEulerDiscreteScheduler config (the file, or a folder holding scheduler_config.json or
    scheduler/scheduler_config.json). Fields that would change the sampler in a way models/flow.py does
    not implement (dynamic shifting, inverted / Karras / exponential / beta sigmas, a terminal shift,
    stochastic sampling) or that this code does not know raise CheckpointError naming them."""
    file = path
    if os.path.isdir(path):
        candidates = [os.path.join(path, "scheduler_config.json"), os.path.join(path, DIT_SCHEDULER_FILE)]
        file = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(file):
        raise CheckpointError(f"no DiT scheduler config at {file} (expected a FlowMatchEulerDiscreteScheduler "
                              "scheduler_config.json)")
    with open(file) as f:
        values = json.load(f)
    name = values.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise CheckpointError(f"{file}: _class_name {name!r}; the DiT sampler implements only "
                              "FlowMatchEulerDiscreteScheduler")
    unsupported = {k: v for k, v in values.items() if k in _FLOW_SCHEDULER_INERT and v != _FLOW_SCHEDULER_INERT[k]}
    unknown = sorted(k for k in values if not k.startswith("_") and k not in _FLOW_SCHEDULER_INERT
                     and k not in _FLOW_SCHEDULER_DYNAMIC_ONLY and k not in ("shift", "num_train_timesteps"))
    if unsupported or unknown:
        raise CheckpointError(
            f"{file}: the DiT sampler (models/flow.py: static shift, linspace sigmas, deterministic Euler) does not "
            f"implement {', '.join(f'{k}={v!r}' for k, v in unsupported.items()) or ''}"
            f"{'; unknown fields ' + str(unknown) if unknown else ''}; supported: num_train_timesteps, shift "
            f"(the others at their defaults {_FLOW_SCHEDULER_INERT})")
    out = {"shift": float(values.get("shift", 1.0)), "num_train_timesteps": int(values.get("num_train_timesteps", 1000))}
    if out["shift"] <= 0 or out["num_train_timesteps"] < 1:
        raise CheckpointError(f"{file}: need shift > 0 and num_train_timesteps >= 1, got {out}")
    return out


# ---------------------------------------------------------------------------------------------
# The pixel decoder (``DIR/diffusion-decoder``)


def _dataclass(cls, values: dict):
    """A frozen config dataclass from JSON values (lists back to tuples so it stays hashable)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def save_decoder(decoder: Decoder, path: str) -> None:
    """Orbax form of a decoder: ``path/params`` ({'unet': ..., 'vae': ...}) + ``path/config.json``."""
    params = {"unet": nnx.to_pure_dict(nnx.state(decoder.unet, nnx.Param))}
    if decoder.vae is not None:
        params["vae"] = nnx.to_pure_dict(nnx.state(decoder.vae, nnx.Param))
    config = {"unet": dataclasses.asdict(decoder.unet.cfg),
              "vae": dataclasses.asdict(decoder.vae.cfg) if decoder.vae is not None else None,
              "scheduler": dataclasses.asdict(decoder.scheduler), "pixel_patch": decoder.pixel_patch}
    save_params(path, params, config)


def is_decoder_dir(path: str) -> bool:
    """A decoder folder in the Orbax form or the diffusers form."""
    return is_model_checkpoint(path) or os.path.exists(os.path.join(path, "unet", "config.json"))


def _load_orbax_decoder(path: str, mesh, rule_table: str, dtype: Any) -> Decoder:
    with open(os.path.join(path, CONFIG_FILE)) as f:
        config = json.load(f)
    kw = {} if dtype is None else dict(dtype=dtype, param_dtype=dtype)
    tables = sharding.rules_for(rule_table)
    ucfg = _dataclass(UNetConfig, config["unet"])
    unet_def, unet_abs = sharding.abstract_with_shardings(
        lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0), **kw), mesh, tables)
    target = {"unet": unet_abs}
    vae_def = None
    if config.get("vae"):
        vcfg = _dataclass(VAEConfig, config["vae"])
        vae_def, target["vae"] = sharding.abstract_with_shardings(
            lambda: AutoencoderKL(vcfg, rngs=nnx.Rngs(0), **kw), mesh, tables)
    restored = restore_params(path, {k: nnx.to_pure_dict(v) for k, v in target.items()})
    for name, state in target.items():
        nnx.replace_by_pure_dict(state, restored[name])
    return Decoder(nnx.merge(unet_def, target["unet"]),
                   nnx.merge(vae_def, target["vae"]) if vae_def is not None else None,
                   _dataclass(sched_lib.SchedulerConfig, config.get("scheduler") or {}),
                   int(config.get("pixel_patch", 1)))


def load_decoder(path: str, mesh, rule_table: str = "replicated", dtype: Any = None) -> Decoder:
    """A decoder folder in diffusers layout (``unet/``, ``vae/``, ``scheduler/``) or its Orbax form;
    ``dtype`` (parameters and compute of UNet and VAE; a name or a numpy dtype) None keeps the stored one
    (float32 from diffusers files, whichever variant was read)."""
    dtype = None if dtype is None else jnp.dtype(dtype)
    if os.path.exists(os.path.join(path, "unet", "config.json")):
        kw = {} if dtype is None else dict(dtype=dtype, param_dtype=dtype)
        unet, vae, sched = decoder_mapping.load_decoder(path, mesh, rule_table, **kw)
        return Decoder(unet, vae, sched)
    if is_model_checkpoint(path):
        return _load_orbax_decoder(path, mesh, rule_table, dtype)
    raise CheckpointError(f"{path}: not a decoder folder (expected unet/ + vae/ + scheduler/ in diffusers layout, "
                          "or params/ + config.json written by blip3o_jax.convert)")


def copy_companions(src: str, dst: str, dtype: Any = None) -> list[str]:
    """What ``generate`` / ``understand`` need beside the model: the tokenizer / processor files are
    copied and ``SRC/diffusion-decoder/`` (diffusers layout) is converted to its Orbax form in
    ``DST/diffusion-decoder/``. Returns what was written."""
    done = copy_tokenizer(src, dst)
    if dit_scheduler_file(src):  # the DiT's schedule travels with the model
        os.makedirs(os.path.join(dst, os.path.dirname(DIT_SCHEDULER_FILE)), exist_ok=True)
        shutil.copyfile(os.path.join(src, DIT_SCHEDULER_FILE), os.path.join(dst, DIT_SCHEDULER_FILE))
        done.append(DIT_SCHEDULER_FILE)
    decoder_src = os.path.join(src, DECODER_DIR)
    if os.path.isdir(decoder_src):
        decoder = load_decoder(decoder_src, conversion.host_mesh(), dtype=dtype)
        save_decoder(decoder, os.path.join(dst, DECODER_DIR))
        done.append(DECODER_DIR + "/")
    return done
