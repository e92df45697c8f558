"""Runs the frozen target encoder once over a data set and stores its features (docs/model.md 3.4, 8, 11).

    python -m blip3o_jax.precompute --config configs/NAME.py --out DIR [--config.KEY=VALUE ...]

In BLIP3-o's generation stages the target encoder (EVA-CLIP, 4.4 B parameters) is frozen and runs on
every image of every step; its output depends only on the image. This command computes it once, so
the head trains on stored features: point ``config.data.paths`` at DIR (alone, or in a mixture
``DIR_A@0.7;DIR_B@0.3``) and the generation stage reads ``target_features`` instead of images and
never runs the encoder (``model.target_encoder='none'`` then also skips building it). The loss is the
same as with on-the-fly features (tests/test_precompute.py).

What it does, for the one data set ``config.data`` names (files, globs, ``tfds:``; a mixture is
refused: precompute each component and mix the outputs):

* the encoder weights come from ``config.train.init_from`` (an Orbax checkpoint of this project or a
  PyTorch directory); the model is built on ``config.mesh`` as for training;
* records are read in source order, decoded and preprocessed exactly as for training
  (``samples.GenerationTransform``'s rules: a record without caption or with a bad image is skipped
  and counted per reason), in ``config.data.num_workers`` Grain worker processes;
* the encoder runs jitted on fixed global batches of ``precompute.batch_size`` (default
  ``data.global_batch_size``); a chunk's last batch is padded (padding rows are dropped);
* the records are split into chunks of ``precompute.records_per_shard``; chunk ``c`` is computed by
  process ``c % process_count`` and written as ``DIR/features-CCCCC-of-NNNNN.array_record`` (plus a
  ``.json`` with its counts) through a temporary file and a rename, so a file that exists is complete.
  An interrupted run, re-run with the same command, skips the finished chunks and produces the same
  files as an uninterrupted one. ``DIR/precompute_spec.json`` records what the files depend on; a re-run
  with a different encoder, data set or chunking is refused;
* with ``precompute.with_condition`` the backbone's condition states for each caption's training
  prompt (``Blip3o.query_states``, (n_query, H)) are stored too; training uses them with
  ``data.precomputed_condition=True`` (then the backbone and the latent queries are fixed);
* when every chunk is done, process 0 writes ``DIR/manifest.json``: the encoder's config, feature shape
  and dtype, record/sample counts and skipped records per reason, and the list of shard files.

Record layout (msgpack map, webdataset member names): ``__key__`` (the source's key), ``txt`` (the
caption: stored as text, so training can change tokenizer or max length), ``json`` (the record's meta,
if any), ``target_features`` and optionally ``condition`` as ``{"dtype", "shape", "data"}``
(``sources.encode_array``; ``precompute.feature_dtype`` float32, or bfloat16 to halve the files at the
cost of rounding the targets).

Every process must run the same command (as for training); each writes only its own chunks.
``DIR`` must be a file system all processes see (local, NFS, gcsfuse).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import sys

import grain
import jax
import numpy as np
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from blip3o_jax import checkpoints, cli, configlib, distributed, sharding
from blip3o_jax.data import pipeline
from blip3o_jax.data import samples as samples_lib
from blip3o_jax.data import sources as sources_lib
from blip3o_jax.models import blip3o as model_lib

VERSION = 1
SPEC_FILE = "precompute_spec.json"


def shard_name(chunk: int, num_chunks: int) -> str:
    return f"features-{chunk:05d}-of-{num_chunks:05d}.array_record"


def _host_batch(elements: list[dict], batch_size: int, image_size: int, max_length: int | None,
                pad_id: int) -> dict[str, np.ndarray]:
    """Fixed-shape host batch; skipped records and the padding of a short batch are dummy rows."""
    batch = {"target_image": np.zeros((batch_size, image_size, image_size, 3), np.float32)}
    if max_length is not None:
        # Dummy rows attend to something (an all-masked row would be 0/0 in the softmax).
        batch.update(input_ids=np.full((batch_size, max_length), pad_id, np.int32),
                     attention_mask=np.ones((batch_size, max_length), np.int32),
                     query_start=np.ones((batch_size,), np.int32))
    for row, e in enumerate(elements):
        if not samples_lib.is_skip(e):
            for name in batch:
                batch[name][row] = e[name]
    return batch


# ---------------------------------------------------------------------------------------------
# Host side


@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef, mesh, with_condition: bool):
    """Jitted (state, global batch) -> {"target_features"[, "condition"]}, batch-sharded like the input
    so each process can take back exactly the rows it fed in."""
    def encode(state, batch):
        model = nnx.merge(graphdef, state)
        out = {"target_features": model.target_features(batch["target_image"])}
        if with_condition:
            out["condition"] = model.query_states(batch["input_ids"], batch["attention_mask"], batch["query_start"])
        return out

    return jax.jit(encode, out_shardings=sharding.batch_sharding(mesh, 3))  # both outputs are (B, *, *)


def _to_host(x, mesh) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, x.sharding.spec))


def _max_over_processes(value: int) -> int:
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _spec(cfg, source, num_records: int, num_chunks: int) -> dict:
    """Everything the output files depend on (compared on resume)."""
    m, p = cfg.model, cfg.precompute
    encoder_cfg = m.eva if m.target_encoder == "eva_clip" else m.siglip2
    spec = {
        "format": sources_lib.PRECOMPUTED_FORMAT,
        "version": VERSION,
        "encoder": {"target_encoder": m.target_encoder, "config": encoder_cfg.to_dict(), "image_size":
                    cfg.data.image_size, "dtype": m.dtype, "param_dtype": m.param_dtype,
                    "init_from": cfg.train.init_from, "seed": cfg.train.seed if not cfg.train.init_from else None},
        "source": {"spec": cfg.data.paths or cfg.data.source, "repr": repr(source), "records": num_records},
        "records_per_shard": p.records_per_shard,
        "num_chunks": num_chunks,
        "feature_dtype": p.feature_dtype,
        "with_condition": p.with_condition,
    }
    if p.with_condition:
        spec["condition_prompt"] = {"form": "training (docs/model.md 4.4)", "tokenizer": cfg.data.tokenizer,
                                    "max_length": cfg.data.max_length, "n_query": m.n_query,
                                    "llm": m.llm.to_dict()}
    return json.loads(json.dumps(spec))  # tuples -> lists, as read back from the file


def _check_spec(out_dir: str, spec: dict) -> None:
    path = os.path.join(out_dir, SPEC_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != spec:
            changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise ValueError(f"{out_dir} holds features precomputed with different settings ({changed} differ); "
                             "use a new --out directory or the original config")
    else:
        _write_atomic(path, json.dumps(spec, indent=1, sort_keys=True))


def _record_bytes(element: dict, features: np.ndarray, condition: np.ndarray | None) -> bytes:
    members = {"__key__": element["key"], "txt": element["caption"],
               "target_features": sources_lib.encode_array(features)}
    if element["meta"] is not None:
        members["json"] = element["meta"]
    if condition is not None:
        members["condition"] = sources_lib.encode_array(condition)
    return sources_lib.encode_record(members)


def _write_chunk(out_dir: str, name: str, records: list[bytes], stats: dict) -> None:
    """The ArrayRecord file appears (rename) only once complete; its counts are written just before."""
    path = os.path.join(out_dir, name)
    tmp = f"{path}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for r in records:
        writer.write(r)
    writer.close()
    _write_atomic(path[: -len(".array_record")] + ".json", json.dumps(stats, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(out_dir: str, spec: dict, feature_shape, condition_shape, problems: dict) -> dict | None:
    """DIR/manifest.json from the chunks' counts; None while a chunk is missing."""
    stats = []
    for c in range(spec["num_chunks"]):
        name = shard_name(c, spec["num_chunks"])
        if not os.path.exists(os.path.join(out_dir, name)):
            return None
        with open(os.path.join(out_dir, name[: -len(".array_record")] + ".json")) as f:
            stats.append(json.load(f))
    skipped = collections.Counter(problems)
    for s in stats:
        skipped.update(s["skipped"])
    manifest = {
        **{k: spec[k] for k in ("format", "version", "encoder", "source", "records_per_shard", "with_condition")},
        "features": {"shape": list(feature_shape), "dtype": spec["feature_dtype"]},
        "condition": ({"shape": list(condition_shape), "dtype": spec["feature_dtype"],
                       **spec["condition_prompt"]} if spec["with_condition"] else None),
        "counts": {"records": sum(s["records"] for s in stats), "samples": sum(s["samples"] for s in stats),
                   "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items()))},
        "shards": [{"file": s["file"], "records": s["records"], "samples": s["samples"]} for s in stats],
    }
    _write_atomic(os.path.join(out_dir, sources_lib.MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def precompute(cfg, out_dir: str, *, model=None, tokenizer=None, data_dir: str | None = None,
               stop_after_chunks: int | None = None, progress: bool = True) -> dict | None:
    """Runs (or resumes) the precomputation into ``out_dir``; returns the manifest (None if stopped early).

    ``model`` overrides the one built from the config (tests reuse one); ``stop_after_chunks`` stops
    after that many chunks of this process, as an interruption would.
    """
    p = cfg.precompute
    if cfg.model.target_encoder == "none":
        raise ValueError("config.model.target_encoder is 'none': there is no target encoder to precompute")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    data_dir = data_dir or os.path.join(out_dir, "source_data")  # the synthetic demo set, if used

    # ---- Data: one source, chunks, this process's share ------------------------------------------
    sources = pipeline.config_sources(cfg, data_dir=data_dir, cache_dir=cfg.data.cache_dir or None)
    if len(sources) != 1:
        raise sources_lib.DataError("precompute one data set at a time (config.data.paths is a mixture); "
                                    "mix the outputs in training instead: data.paths='DIR_A@0.7;DIR_B@0.3'")
    source = sources[0][0]
    if isinstance(source, sources_lib.PrecomputedSource):
        raise sources_lib.DataError(f"{source.directory} already holds precomputed features")
    num_records = len(source)
    chunk_size = p.records_per_shard
    num_chunks = math.ceil(num_records / chunk_size)
    spec = _spec(cfg, source, num_records, num_chunks)
    _check_spec(out_dir, spec)

    pi, pc = jax.process_index(), jax.process_count()
    global_batch = p.batch_size or cfg.data.global_batch_size
    if global_batch % pc:
        raise ValueError(f"precompute batch {global_batch} is not divisible by the {pc} processes")
    local_batch = global_batch // pc
    bounds = lambda c: (c * chunk_size, min((c + 1) * chunk_size, num_records))
    mine = range(pi, num_chunks, pc)
    pending = [c for c in mine if not os.path.exists(os.path.join(out_dir, shard_name(c, num_chunks)))]
    if stop_after_chunks is not None:
        pending = pending[:stop_after_chunks]
    batches_of = lambda c: math.ceil((bounds(c)[1] - bounds(c)[0]) / local_batch)
    my_steps = sum(batches_of(c) for c in pending)
    # Every process joins every jitted call (SPMD): those with less left feed dummy batches.
    steps = _max_over_processes(my_steps)
    logging.info("precompute: %d records in %d chunks; process %d/%d: %d chunks to do (%d done before)",
                 num_records, num_chunks, pi, pc, len(pending), len(mine) - len(pending))

    # ---- Model ----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh)
    if model is None:
        model = model_lib.build_model(cfg, mesh)
        if cfg.train.init_from:
            checkpoints.restore_into(model, cfg.train.init_from)
        else:
            logging.warning("precompute: config.train.init_from is empty: the target encoder has RANDOM weights")
    with_condition = bool(p.with_condition)
    if with_condition and tokenizer is None:
        tokenizer = pipeline.load_tokenizer(cfg, data_dir)
    graphdef, state = nnx.split(model)
    encode = _encode_fn(graphdef, mesh, with_condition)
    size = cfg.data.image_size
    image_spec = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
    feature_shape = jax.eval_shape(model.target_features, image_spec).shape[1:]
    condition_shape = (cfg.model.n_query, cfg.model.llm.hidden_size) if with_condition else None
    store_dtype = np.dtype(jax.numpy.bfloat16) if p.feature_dtype == "bfloat16" else np.dtype(np.float32)

    # ---- Reading: the pending chunks' records, in order, decoded in worker processes -------------
    indices = np.concatenate([np.arange(*bounds(c)) for c in pending] or [np.zeros((0,), np.int64)])
    transform = samples_lib.PrecomputeTransform(size, cfg.model.target_encoder, tokenizer if with_condition else None,
                                    cfg.data.max_length, cfg.model.n_query,
                                    samples_lib.SpecialIds.from_config(cfg.model), cfg.data.generation_prompt)
    elements = iter(())
    if len(indices):
        ds = grain.MapDataset.source(samples_lib.SelectedRecords(source, indices)).map(transform)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local_batch))
        if cfg.data.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers,
                                                             per_worker_buffer_size=local_batch))
        elements = iter(ds)

    def run(host_batch):
        model_lib.check_batch_ids(host_batch, cfg, "precompute batch")  # host-side, before the jitted pass
        with jax.set_mesh(mesh):
            out = encode(state, sharding.shard_host_batch(host_batch, mesh))
        return {k: _to_host(v, mesh) for k, v in out.items()}

    bar = None
    if progress and pi == 0:
        bar = tqdm(total=len(indices), desc="precompute", unit="rec", file=sys.stderr)
    max_length = cfg.data.max_length if with_condition else None
    pad_id = cfg.model.pad_token_id
    done = 0
    for c in pending:
        lo, hi = bounds(c)
        records, skipped = [], collections.Counter()
        for start in range(lo, hi, local_batch):
            group = [next(elements) for _ in range(min(local_batch, hi - start))]
            out = run(_host_batch(group, local_batch, size, max_length, pad_id))
            done += 1
            for row, e in enumerate(group):
                if samples_lib.is_skip(e):
                    skipped[e[samples_lib.SKIP_KEY]] += 1
                    continue
                cond = out["condition"][row].astype(store_dtype) if with_condition else None
                records.append(_record_bytes(e, out["target_features"][row].astype(store_dtype), cond))
            if bar is not None:
                bar.update(len(group))
        name = shard_name(c, num_chunks)
        stats = {"file": name, "chunk": c, "records": hi - lo, "samples": len(records), "skipped": dict(skipped),
                 "process_index": pi}
        _write_chunk(out_dir, name, records, stats)
    dummy = _host_batch([], local_batch, size, max_length, pad_id)
    for _ in range(steps - done):
        run(dummy)
    if bar is not None:
        bar.close()
    if hasattr(elements, "close"):
        elements.close()

    if pc > 1:
        multihost_utils.sync_global_devices("blip3o_jax.precompute: chunks written")
    if pi != 0:
        return None
    manifest = write_manifest(out_dir, spec, feature_shape, condition_shape, getattr(source, "problems", {}))
    if manifest is None:
        logging.info("precompute: stopped before every chunk was written; re-run the same command to continue")
    else:
        logging.info("precompute: done, %s", json.dumps(manifest["counts"]))
    return manifest


# ---------------------------------------------------------------------------------------------
# Command line


def run() -> None:
    """``python -m blip3o_jax.precompute`` and the ``blip3o-precompute`` console script."""
    # Flags are defined here, not at import, so tests can import this module beside blip3o_jax.train.
    cli.define_config_flag("configs/demo.py or configs/blip3o_8b.py")
    flags.DEFINE_string("out", None, "Output directory (ArrayRecord shards + manifest.json); re-run to resume.")
    flags.DEFINE_string("data_dir", None, "Where the synthetic demo set is written if config.data names it "
                        "(default OUT/source_data).")
    cli.define_distributed_flag()
    flags.mark_flags_as_required(["config", "out"])
    FLAGS = flags.FLAGS

    def main(argv):
        del argv
        cli.setup_logging()
        distributed.maybe_initialize(FLAGS.distributed)  # before anything touches devices
        try:
            configlib.validate(FLAGS.config, num_devices=jax.device_count())
        except configlib.ConfigError as e:
            raise app.UsageError(str(e)) from None
        precompute(FLAGS.config, FLAGS.out, data_dir=FLAGS.data_dir)

    cli.run(main)


if __name__ == "__main__":
    run()
