"""Streaming conversion between the released PyTorch BLIP3-o layout and the NNX ``Blip3o`` (contract
sections 2-3, docs/model.md 10). The public entry points are re-exported by ``blip3o_jax.convert``
(``from blip3o_jax.convert import load_torch, save_torch``), whose CLI drives this module; this layer sits
below ``blip3o_jax.checkpoints`` (which reads PyTorch directories through it) and knows no directory
layout beyond the PyTorch one.

A PyTorch directory is ``config.json`` (transformers-4.51 flat or transformers-5 nested Qwen2.5-VL
fields, the BLIP3-o fields, optional ``dit_config`` / ``gen_vision_config`` size blocks) plus sharded
safetensors. One mapping table covers the whole model: the Qwen tables of qwen_mapping (either key
naming, through ``qwen_mapping.canonical_view``), ``model.latent_queries``, the generation head's table
(the head registry says which, e.g. the DiT's under ``model.dit.model.``) and the EVA table under
``model.gen_vision_tower.vision_tower.model.`` (fused or split q/v bias). Coverage is checked ONCE over
all of it, so every missing, unexpected and mis-shaped key of every component is named in one
``CheckpointMismatchError``; then tensors stream one at a time into their target shardings
(weights.load_component). Tolerated: extra ``model.vae.*``, a missing target encoder (then the model has
none, or keeps the one it has: ``load_into``), a missing ``lm_head.weight`` when embeddings are tied.

``torch_to_orbax`` writes lone parameter arrays in groups (Orbax partial saves) and every stacked
(layers, ...) array one layer slice at a time into its layer-sized chunks (TensorStore), ``orbax_to_torch``
reads one tensor (one layer slice) at a time into safetensors shards whose headers are planned up front,
so peak host memory follows the largest single tensor, not a stacked array or the model
(benchmarks/convert_memory.py measures it). Both write beside the destination and rename when complete
(``staged_directory``), so a failed run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorstore as ts
from flax import nnx
from orbax.checkpoint.experimental import v1 as ocp_v1
from tqdm import tqdm

from blip3o_jax import configlib, sharding, weights
from blip3o_jax.models import blip3o as model_lib
from blip3o_jax.models import eva_mapping, heads, qwen_mapping
from blip3o_jax.models.eva_clip import EvaConfig
from blip3o_jax.weights import Rule

QUERIES_KEY = "model.latent_queries"
EVA_PREFIX = eva_mapping.RELEASED_PREFIX  # model.gen_vision_tower.vision_tower.model.
# Present in the released files, not part of this model: the leftover FLUX VAE of an abandoned variant
# (docs/model.md 10.1) and the weightless identity projector.
ALWAYS_IGNORED = (r"model\.vae\.", r"model\.down_projector\.")
EVA_UNUSED = tuple(re.escape(EVA_PREFIX) + p for p in eva_mapping.UNUSED_AFTER_BLOCKS)
# config.json names of the optional EVA size block (contract 3) <-> EvaConfig fields.
EVA_JSON_FIELDS = ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "postnorm",
                   "qkv_bias")
# The released layout's head: the DiT velocity network of the flow head.
RELEASED_HEAD = ("flow", "dit")


# ---------------------------------------------------------------------------------------------
# config.json <-> project config


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = jnp.float32, target_encoder: str | None = None,
                   vocab_size: int | None = None,
                   stored_shape: Callable[[str], tuple[int, ...] | None] | None = None) -> ml_collections.ConfigDict:
    """The project config of a BLIP3-o ``config.json`` (absent blocks = released values).

    ``vocab_size`` overrides the config's (the embedding rows actually stored); ``target_encoder``
    overrides the choice implied by ``gen_vision_tower``; ``stored_shape(torch key)`` (None if absent)
    lets sizes the config cannot say be read from the weights (the DiT's FFN rule: dit_mapping).
    """
    cfg = configlib.base_config()
    m = cfg.model
    m.gen_head, m.denoiser = RELEASED_HEAD
    text_cfg, vision_cfg = qwen_mapping.configs_from_hf(hf)
    if vocab_size is not None:
        text_cfg = dataclasses.replace(text_cfg, vocab_size=vocab_size)
    configlib.assign(m.llm, dataclasses.asdict(text_cfg))
    if vision_cfg is not None:
        configlib.assign(m.vision, dataclasses.asdict(vision_cfg))
    m.vision.out_hidden_size = text_cfg.hidden_size

    # The released head (the flow head's DiT) reads its optional size block through its own mapping.
    _, denoiser = RELEASED_HEAD
    configlib.assign(m[denoiser], heads.velocity_net_spec(denoiser).mapping.config_from_hf(
        hf, text_cfg.hidden_size, stored_shape))

    eva = dict(hf.get("gen_vision_config") or {})
    eva = {k: v for k, v in eva.items() if k in EVA_JSON_FIELDS}  # EVA-CLIP json also holds xattn, ...
    configlib.assign(m.eva, eva)
    if hf.get("gen_pooling"):
        m.eva.pooling = hf["gen_pooling"]

    tower = str(hf.get("gen_vision_tower") or "eva-clip-E-14-plus").lower()
    if target_encoder is None:
        if "eva" not in tower:
            raise ValueError(f"config.json gen_vision_tower {tower!r}: only EVA-CLIP target encoders convert "
                             "(pass with_target_encoder=False to load the rest)")
        target_encoder = "eva_clip"
    m.target_encoder = target_encoder

    tokens = qwen_mapping.token_ids_from_hf(hf)
    m.n_query = int(hf.get("n_query", m.n_query))
    m.gen_start_token_id = int(hf.get("gen_start_token_id", m.gen_start_token_id))
    m.image_pad_token_id = int(tokens["image_token_id"])
    m.vision_start_token_id = int(tokens["vision_start_token_id"])
    m.vision_end_token_id = int(tokens["vision_end_token_id"])
    m.pad_token_id = int(tokens["pad_token_id"])
    name = jnp.dtype(dtype).name
    m.dtype = m.param_dtype = name
    m.remat = "none"
    return configlib.validate(cfg)


def project_config_from_model(mcfg: model_lib.Blip3oConfig, base: ml_collections.ConfigDict | None = None):
    """A project config that rebuilds a model with config ``mcfg`` (other keys from ``base`` or defaults)."""
    cfg = configlib.from_dict(base.to_dict() if base is not None else None)
    m = cfg.model
    for key in ("n_query", "gen_head", "denoiser", "target_encoder", "gen_start_token_id", "image_pad_token_id",
                "vision_start_token_id", "dtype", "param_dtype", "remat"):
        m[key] = getattr(mcfg, key)
    if base is None:
        # The model holds no <|vision_end|> id (it never reads it); Qwen2.5-VL's vocabulary places it right
        # after <|vision_start|> (151652 / 151653). Without it an export of a small-vocabulary model would
        # drop the out-of-range default and a reader (check_config_token_ids) would refuse the file.
        m.vision_end_token_id = mcfg.vision_start_token_id + 1
    for name, value in (("llm", mcfg.llm), ("vision", mcfg.vision), (configlib.head_section(cfg), mcfg.head),
                        ("eva", mcfg.eva), ("siglip2", mcfg.siglip2)):
        if value is not None:
            configlib.assign(m[name], dataclasses.asdict(value))
    return cfg


def hf_config(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.json in the released (transformers-4.51 flat) form, with the BLIP3-o fields; the
    ``dit_config`` / ``gen_vision_config`` blocks only when the sizes differ from the released ones."""
    m = cfg.model
    llm, vis, eva = (configlib.component(cfg, n) for n in ("llm", "vision", "eva"))
    mapping = released_mapping(m.gen_head, m.denoiser)
    out: dict[str, Any] = {
        "architectures": ["blip3oQwenForInferenceLM"],
        "model_type": "blip3o_qwen",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_hidden_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(llm.mrope_section)},
        "hidden_act": "silu",
        "max_position_embeddings": 128000,
        "use_sliding_window": False,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "torch_dtype": "float32",
        "vision_config": {
            "depth": vis.depth,
            "hidden_size": vis.hidden_size,
            "num_heads": vis.num_heads,
            "intermediate_size": vis.intermediate_size,
            "in_chans": vis.in_channels,
            "in_channels": vis.in_channels,
            "patch_size": vis.patch_size,
            "spatial_patch_size": vis.patch_size,
            "temporal_patch_size": vis.temporal_patch_size,
            "spatial_merge_size": vis.spatial_merge_size,
            "window_size": vis.window_size,
            "fullatt_block_indexes": list(vis.fullatt_block_indexes),
            "out_hidden_size": vis.out_hidden_size,
            "hidden_act": "silu",
        },
        "image_token_id": m.image_pad_token_id,
        "vision_start_token_id": m.vision_start_token_id,
        "vision_end_token_id": m.vision_end_token_id,
        "pad_token_id": m.pad_token_id,
        "gen_start_token_id": m.gen_start_token_id,
        "n_query": m.n_query,
        "gen_hidden_size": configlib.head_config(cfg).in_channels,
        "gen_pooling": eva.pooling,
        "gen_vision_tower": "eva-clip-E-14-plus" if m.target_encoder == "eva_clip" else None,
    }
    # Ids outside the vocabulary (the released defaults of a model built with a small test vocabulary)
    # would break readers that build an Embedding(padding_idx=pad); leave them out.
    for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id", "pad_token_id", "gen_start_token_id"):
        if out[key] >= llm.vocab_size:
            del out[key]
    out.update(mapping.config_to_hf(configlib.head_config(cfg)))
    eva_block = {k: getattr(eva, k) for k in EVA_JSON_FIELDS}
    if m.target_encoder == "eva_clip" and eva_block != {k: getattr(EvaConfig(), k) for k in EVA_JSON_FIELDS}:
        out["gen_vision_config"] = eva_block
    return out



# ---------------------------------------------------------------------------------------------
# The whole-model mapping table


def _under(rules, torch_prefix: str, nnx_prefix: str) -> list[Rule]:
    return [Rule(torch_prefix + r.torch, nnx_prefix + r.nnx, r.transform) for r in rules]


def released_mapping(gen_head: str, denoiser: str):
    """The head's mapping module, or a ValueError saying the head has no released PyTorch layout."""
    head = heads.torch_mapping(gen_head, denoiser)
    if head is None:
        raise ValueError(f"generation head {gen_head!r} (model.denoiser {denoiser!r}) has no released PyTorch "
                         "layout; only heads whose registry entry has a mapping export")
    return head[2]


def model_rules(mcfg: model_lib.Blip3oConfig, *, with_target_encoder: bool = True) -> list[Rule]:
    """Parameters of ``Blip3o`` -> their released (4.51) torch keys. Not in the released layout, so not
    mapped: a SigLIP2 target encoder and a head without a PyTorch mapping in the registry (e.g. 'mse',
    whose model then loads the backbone and queries only)."""
    rules = _under(qwen_mapping.rules((mcfg.llm, mcfg.vision)), "", "backbone/")
    rules.append(Rule(QUERIES_KEY, "latent_queries"))
    head = heads.torch_mapping(mcfg.gen_head, mcfg.denoiser)
    if head is not None:
        torch_prefix, nnx_prefix, mapping = head
        rules += _under(mapping.rules(mcfg.head), torch_prefix, nnx_prefix)
    if with_target_encoder and mcfg.target_encoder == "eva_clip":
        rules += _under(eva_mapping.rules(mcfg.eva), EVA_PREFIX, "target_encoder/")
    return rules


def _subset(state: nnx.State, paths) -> nnx.State:
    keep = set(paths)
    return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if "/".join(map(str, p)) in keep])


class _Progress:
    """A checkpoint view that advances a tqdm bar on every tensor read (reads stay lazy)."""

    def __init__(self, ckpt, total: int, desc: str, enabled: bool):
        self.ckpt, self.bar = ckpt, None
        if enabled:
            self.bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)

    def keys(self):
        return self.ckpt.keys()

    def shape(self, key):
        return self.ckpt.shape(key)

    def __contains__(self, key):
        return key in self.ckpt

    def get(self, key):
        x = self.ckpt.get(key)
        if self.bar is not None:
            self.bar.update(1)
        return x

    def close(self):
        if self.bar is not None:
            self.bar.close()


class TorchDirectory:
    """A BLIP3-o PyTorch directory: its config.json and a lazy view of every tensor under the released
    (4.51) names, whatever the naming on disk (transformers-5 Qwen names, timm-style split EVA q/v bias)."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.path = os.fspath(path)
        config = os.path.join(self.path, "config.json")
        if not os.path.exists(config):
            raise FileNotFoundError(f"{self.path}: no config.json (expected a BLIP3-o / Qwen2.5-VL directory)")
        with open(config) as f:
            self.hf_config = json.load(f)
        raw = weights.TorchCheckpoint(self.path, allow_pickle=allow_pickle)
        self.ckpt = eva_mapping.FusedQkvBiasView(qwen_mapping.canonical_view(raw))

    def has_target_encoder(self) -> bool:
        return any(k.startswith(EVA_PREFIX) for k in self.ckpt.keys())

    def vocab_size(self) -> int | None:
        key = "model.embed_tokens.weight"
        return self.ckpt.shape(key)[0] if key in self.ckpt else None

    def config(self, dtype=jnp.float32, with_target_encoder: bool | None = None) -> ml_collections.ConfigDict:
        if with_target_encoder is None:
            with_target_encoder = self.has_target_encoder()
        return config_from_hf(self.hf_config, dtype=dtype, target_encoder=None if with_target_encoder else "none",
                              vocab_size=self.vocab_size(),
                              stored_shape=lambda key: self.ckpt.shape(key) if key in self.ckpt else None)

    def ignore(self, mcfg: model_lib.Blip3oConfig, with_target_encoder: bool) -> list[str]:
        """Keys that may be present without being loaded."""
        out = list(ALWAYS_IGNORED) + list(EVA_UNUSED)
        if mcfg.llm.tie_word_embeddings:
            out.append(r"lm_head\.weight$")
        if not with_target_encoder:
            out.append(re.escape("model.gen_vision_tower."))
        head = heads.torch_mapping(mcfg.gen_head, mcfg.denoiser)
        out += [re.escape(spec.mapping.PREFIX) for spec in heads.VELOCITY_NETS.values()
                if spec.mapping is not None and (head is None or spec.mapping.PREFIX != head[0])]
        return out


def _fill(directory: TorchDirectory, mcfg, abstract: nnx.State, *, with_target_encoder: bool,
          progress: bool = True) -> nnx.State:
    """One coverage check over every component, then every tensor streamed into its sharding."""
    rules = model_rules(mcfg, with_target_encoder=with_target_encoder)
    abstract = _subset(abstract, [r.nnx for r in rules])
    view = _Progress(directory.ckpt, 0, "loading tensors", progress)
    try:
        expected = weights.expected_torch_keys(rules, abstract)
        weights.check_coverage({k: view.shape(k) for k in view.keys()}, expected,
                               ignore=directory.ignore(mcfg, with_target_encoder),
                               where=f"BLIP3-o checkpoint {directory.path}")
        if view.bar is not None:
            view.bar.total = len(expected)
        return weights.load_component(view, rules, abstract, check=False)
    finally:
        view.close()


def default_mesh() -> jax.sharding.Mesh:
    """Every device on the data axis (parameters follow the config's rule tables)."""
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def host_mesh() -> jax.sharding.Mesh:
    """One CPU device: where the CLI converts (memory-bounded streaming, no accelerator needed)."""
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices("cpu")[:1])


def load_torch(path: str | os.PathLike, dtype: Any = jnp.float32, mesh: jax.sharding.Mesh | None = None, *,
               allow_pickle: bool = False, with_target_encoder: bool | None = None,
               progress: bool = False) -> model_lib.Blip3o:
    """A ``Blip3o`` from a PyTorch directory (contract 3), parameters (in ``dtype``) streamed one tensor
    at a time into their sharding on ``mesh`` (default: every device on the data axis; config.sharding
    rule tables, 'fsdp'). ``with_target_encoder``: None = load it if the checkpoint has it, False = skip
    it, True = require it. Raises CheckpointMismatchError naming every offending key."""
    directory = TorchDirectory(path, allow_pickle=allow_pickle)
    if with_target_encoder is None:
        with_target_encoder = directory.has_target_encoder()
    cfg = directory.config(dtype, with_target_encoder)
    mcfg = model_lib.Blip3oConfig.from_config(cfg)
    graphdef, abstract = model_lib.abstract_model(cfg, mesh or default_mesh())
    state = _fill(directory, mcfg, abstract, with_target_encoder=with_target_encoder, progress=progress)
    return nnx.merge(graphdef, state)


def load_into(model: model_lib.Blip3o, path: str | os.PathLike, *, allow_pickle: bool = False,
              progress: bool = False) -> None:
    """Fills an existing model in place from a PyTorch directory (training ``init_from``): arrays land
    in the shardings and dtypes the model already has. A checkpoint without the target encoder leaves
    the model's target encoder as it is. The checkpoint's sizes must match the model's."""
    directory = TorchDirectory(path, allow_pickle=allow_pickle)
    mcfg = model.cfg
    with_target = mcfg.target_encoder == "eva_clip" and directory.has_target_encoder()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            nnx.state(model, nnx.Param))
    nnx.update(model, _fill(directory, mcfg, abstract, with_target_encoder=with_target, progress=progress))


# ---------------------------------------------------------------------------------------------
# Export


def export_tensors(model: model_lib.Blip3o) -> Iterator[tuple[str, np.ndarray]]:
    """(released torch key, numpy tensor) for every parameter, one at a time (a SigLIP2 target encoder
    is not part of the released layout and is skipped)."""
    released_mapping(model.cfg.gen_head, model.cfg.denoiser)  # raises for heads without one
    return weights.export_component(model_rules(model.cfg), nnx.state(model, nnx.Param))


def save_torch(model: model_lib.Blip3o, path: str | os.PathLike, max_shard_bytes: int = 2 << 30, *,
               config: ml_collections.ConfigDict | None = None, progress: bool = False) -> None:
    """Writes the released layout: flat config.json + sharded safetensors with index, one tensor at a
    time. ``config`` (a project config) supplies the ids the model does not hold (pad, vision end)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = project_config_from_model(model.cfg, config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    released_mapping(model.cfg.gen_head, model.cfg.denoiser)  # raises for heads without one
    state = nnx.state(model, nnx.Param)
    expected = weights.expected_torch_keys(model_rules(model.cfg), state)
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}

    def read(key):
        path, layer, transform, _ = expected[key]
        x = flat[path][layer] if layer is not None else flat[path]
        return weights.to_torch_layout(np.asarray(jax.device_get(x)), transform)

    specs = [(key, shape, np.dtype(flat[e[0]].dtype)) for key, e in expected.items() for shape in [e[3]]]
    bar = tqdm(total=len(specs), desc="writing tensors", unit="tensor", file=sys.stderr) if progress else None
    try:
        # One tensor in host memory at a time (a whole shard is never assembled).
        weights.save_safetensors_streamed(specs, read, path, max_shard_bytes=max_shard_bytes,
                                          on_tensor=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()



# ---------------------------------------------------------------------------------------------
# Staged output: nothing half-written under the destination's name


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, marker: str = "config.json") -> Iterator[str]:
    """Yields a fresh folder beside ``dst`` to write into; on success its entries replace those of
    ``dst`` (a missing ``dst`` is one rename), on any failure it is removed and ``dst`` is untouched.

    An interrupted or failed conversion thus never leaves a half-written checkpoint that a later load
    could take for a whole one. Into an existing ``dst`` the ``marker`` file (what makes a folder a
    checkpoint to its readers: config.json) is removed first and moved in last, so even a kill during
    the final moves leaves a folder no loader accepts. Leftover staging folders of killed runs are
    named ``.NAME.partial-*`` beside it and can be deleted.
    """
    dst = os.path.abspath(os.fspath(dst))
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.exists(dst):
        os.replace(staging, dst)
        return
    entries = sorted(os.listdir(staging), key=lambda e: e == marker)  # the marker last
    if marker in entries and os.path.exists(os.path.join(dst, marker)):
        os.remove(os.path.join(dst, marker))
    for entry in entries:
        target = os.path.join(dst, entry)
        if os.path.isdir(target) and not os.path.islink(target):
            old = tempfile.mkdtemp(prefix=f".{entry}.old-", dir=dst)
            os.replace(target, os.path.join(old, entry))
            shutil.rmtree(old)
        os.replace(os.path.join(staging, entry), target)
    os.rmdir(staging)


# ---------------------------------------------------------------------------------------------
# PyTorch directory -> Orbax parameters, streamed


def _host_leaf(view, entries, shape, dtype) -> np.ndarray:
    """One parameter array in NNX layout for the Orbax save: a lone tensor as read (one copy only if it is
    transposed); a stacked layer array a zero-stride placeholder of its shape that holds no memory (its
    layers are written one at a time afterwards: _write_layers)."""
    if entries[0][1] is not None:
        return np.broadcast_to(np.zeros((), dtype), shape)
    ((key, _, transform),) = entries
    # Contiguous before Orbax sees it: it would otherwise copy a transposed view twice.
    return np.ascontiguousarray(weights.to_jax_layout(view.get(key), transform), dtype=dtype)


def _release_freed_memory() -> None:
    """Hands memory freed by the Orbax/TensorStore writer threads back to the OS (glibc keeps freed
    small blocks in per-thread arenas, which would otherwise add up to about one group per save)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _group_tree(view, group, entries) -> dict:
    tree: dict = {}
    for path, shape, dtype in group:
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _host_leaf(view, entries["/".join(map(str, path))], shape, dtype)
    return tree


def _array_store(params_dir: str, path, *, write: bool = False):
    """The TensorStore array of one parameter of an Orbax parameter tree (Orbax's own layout: zarr
    arrays named by the dotted tree path inside one OCDBT key-value store)."""
    name = ".".join(map(str, path))
    kvstore = {"driver": "ocdbt", "base": "file://" + params_dir, "path": name}
    errors = []
    for driver in ("zarr3", "zarr"):  # Orbax writes zarr3; older checkpoints zarr v2
        try:
            return ts.open({"driver": driver, "kvstore": kvstore, "recheck_cached_data": False,
                            "recheck_cached_metadata": False}, open=True, read=True, write=write).result()
        except ValueError as e:
            errors.append(str(e))
    raise FileNotFoundError(f"{params_dir}: no array {name!r} ({'; '.join(errors)})")


def _write_layers(params_dir: str, stacked: list, view, entries) -> None:
    """Fills every stacked array, one layer at a time, into the finished Orbax tree: the arrays were
    saved chunked one layer per chunk (shard_axes=(0,)), so writing layer i touches its chunk alone and
    host memory stays near one tensor, whatever the size of the stack."""
    for path, shape, dtype in stacked:
        store = _array_store(params_dir, path, write=True)
        if tuple(store.shape) != tuple(shape):
            raise ValueError(f"{params_dir}: {'/'.join(map(str, path))} stored as {tuple(store.shape)}, "
                             f"expected {tuple(shape)}")
        for key, layer, transform in entries["/".join(map(str, path))]:
            # In the chunk's own (C) order, so TensorStore may use the array as the chunk instead of
            # copying it (the torch-layout read is freed before the write starts).
            x = np.ascontiguousarray(weights.to_jax_layout(view.get(key), transform), dtype=dtype)
            store[layer].write(x, can_reference_source_data_indefinitely=True).result()
            del x
        _release_freed_memory()


def torch_to_orbax(src: str | os.PathLike, params_dir: str | os.PathLike, dtype: Any = jnp.float32, *,
                   allow_pickle: bool = False, group_bytes: int = 256 << 20,
                   progress: bool = True) -> ml_collections.ConfigDict:
    """PyTorch directory -> the Orbax parameter tree in ``params_dir`` (the layout
    ``checkpoints.restore_params`` reads), never holding the whole model; returns the project config
    (the caller stores it beside). After the one coverage check, the lone parameter arrays are read on
    the host as numpy arrays (no device copies) and written in groups of about ``group_bytes`` with Orbax
    partial saves; each stacked (layers, ...) array is saved as a memory-free placeholder chunked one
    layer per chunk and then filled slice by slice through TensorStore, so peak host memory is about
    the largest single tensor plus one group, not the largest stack. The result restores onto any mesh.
    The tree is assembled in ``params_dir + '.partial'`` and renamed when complete."""
    directory = TorchDirectory(src, allow_pickle=allow_pickle)
    with_target = directory.has_target_encoder()
    cfg = directory.config(dtype, with_target)
    mcfg = model_lib.Blip3oConfig.from_config(cfg)
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: model_lib.Blip3o(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    rules = model_rules(mcfg, with_target_encoder=with_target)
    expected = weights.expected_torch_keys(rules, abstract)
    weights.check_coverage({k: directory.ckpt.shape(k) for k in directory.ckpt.keys()}, expected,
                           ignore=directory.ignore(mcfg, with_target), where=f"BLIP3-o checkpoint {src}")
    entries: dict[str, list] = {}
    for key, (path, layer, transform, _) in expected.items():
        entries.setdefault(path, []).append((key, layer, transform))

    groups: list[list[tuple]] = [[]]
    stacked: list[tuple] = []
    size = 0
    for path, v in nnx.to_flat_state(abstract):
        v = v.get_value()
        leaf = (path, tuple(v.shape), jnp.dtype(v.dtype))
        if entries["/".join(map(str, path))][0][1] is not None:
            stacked.append(leaf)  # placeholders cost nothing: any group takes them
            groups[-1].append(leaf)
            continue
        nbytes = int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
        if groups[-1] and size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(leaf)
        size += nbytes
    params_dir = os.path.abspath(os.fspath(params_dir))
    view = _Progress(directory.ckpt, len(expected), "converting tensors", progress)
    try:
        write_param_tree(view, groups, stacked, entries, params_dir, group_bytes)
    finally:
        view.close()
    return cfg


def write_param_tree(view, groups: list[list[tuple]], stacked: list[tuple], entries: Mapping[str, list],
                     params_dir: str, group_bytes: int = 256 << 20) -> None:
    """Writes an Orbax parameter tree into ``params_dir`` from the torch tensors of ``view``: ``groups``
    of leaves (path, shape, dtype), one Orbax partial save each; ``stacked`` the leaves stored one layer
    per chunk and filled slice by slice (_write_layers); ``entries['a/b/c']`` = [(torch key, layer or
    None, transform)]. Assembled in ``params_dir + '.partial'``, renamed when complete, removed on failure."""
    layered = {path for path, _, _ in stacked}
    os.makedirs(os.path.dirname(params_dir), exist_ok=True)
    staging = params_dir + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    # The arrays are ours and never modified while written: no defensive host copy, bounded write buffers.
    context = ocp_v1.Context()
    context.memory.deepcopy_host_arrays = False
    context.memory.write_concurrent_bytes = group_bytes
    # A stacked array is stored one layer per chunk (chunking along axis 0 only), the rest as Orbax chooses.
    one_layer_chunks = ocp_v1.options.ArrayOptions.Saving.StorageOptions(shard_axes=(0,))
    context.array.saving.scoped_storage_options_creator = (
        lambda keypath, _: one_layer_chunks if tuple(_key_names(keypath)) in layered else None)
    try:
        with context:
            for group in groups:
                # The plain nested dict of checkpoints.save_params, one group of keys per partial save.
                ocp_v1.partial.save(staging, _group_tree(view, group, entries))
                _release_freed_memory()
        ocp_v1.partial.finalize(staging)
        # The finalized partial checkpoint holds the pytree under 'state/': that folder is the parameter tree.
        _write_layers(os.path.join(staging, "state"), stacked, view, entries)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(params_dir, ignore_errors=True)
    os.replace(os.path.join(staging, "state"), params_dir)
    shutil.rmtree(staging)


def _key_names(keypath) -> Iterator[Any]:
    """The dict keys of a jax key path, as the NNX flat-state path holds them."""
    for k in keypath:
        yield getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


# ---------------------------------------------------------------------------------------------
# Orbax parameters -> PyTorch directory, streamed


def orbax_to_torch(params_dir: str | os.PathLike, cfg: ml_collections.ConfigDict, dst: str | os.PathLike, *,
                   max_shard_bytes: int = 2 << 30, dtype: Any | None = None, progress: bool = True,
                   overlay_dir: str | os.PathLike | None = None) -> None:
    """An Orbax parameter tree (``checkpoints.restore_params``' layout) of the model described by the
    project config ``cfg`` -> the released PyTorch layout in ``dst``, one tensor at a time: each torch
    tensor is read from its array (one layer slice of a stacked array) through TensorStore and appended
    to a safetensors shard whose header was planned from the shapes up front
    (weights.save_safetensors_streamed), so neither the model nor a shard is ever held in memory.
    ``dtype``: cast every float tensor (default: as stored). ``overlay_dir``: a second tree of the same
    paths (a stage's params_ema/, usually a subset) whose arrays replace those of ``params_dir``."""
    params_dir = os.path.abspath(os.fspath(params_dir))
    mcfg = model_lib.Blip3oConfig.from_config(cfg)
    released_mapping(mcfg.gen_head, mcfg.denoiser)  # raises for heads without a released layout
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: model_lib.Blip3o(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    expected = weights.expected_torch_keys(model_rules(mcfg), abstract)
    paths = {"/".join(map(str, p)): p for p, _ in nnx.to_flat_state(abstract)}
    stores: dict[str, Any] = {}

    def store(path: str):
        if path not in stores:
            keys = [str(p) for p in paths[path]]
            stores[path] = None
            if overlay_dir is not None:
                try:  # the overlay holds only some paths (the trained ones): the others come from params_dir
                    stores[path] = _array_store(os.path.abspath(os.fspath(overlay_dir)), keys)
                except FileNotFoundError:
                    pass
            if stores[path] is None:
                stores[path] = _array_store(params_dir, keys)
        return stores[path]

    specs = []
    for key, (path, layer, transform, shape) in expected.items():
        stored = np.dtype(store(path).dtype.numpy_dtype)
        out = jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(stored, jnp.floating) else stored
        specs.append((key, shape, out))

    def read(key: str) -> np.ndarray:
        path, layer, transform, _ = expected[key]
        t = store(path)
        x = (t[layer] if layer is not None else t).read().result()
        x = weights.to_torch_layout(x, transform)
        return x if dtype is None or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)

    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config(project_config_from_model(mcfg, cfg)), f, indent=2)
    bar = tqdm(total=len(specs), desc="writing tensors", unit="tensor", file=sys.stderr) if progress else None
    try:
        weights.save_safetensors_streamed(specs, read, dst, max_shard_bytes=max_shard_bytes,
                                          on_tensor=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
