"""The Grain input pipeline: host sharding, seeded shuffling, worker decode, fixed-shape batches.

Order of operations (one *global* sample stream, every host reads its own rows of each batch)::

    source(s) --shuffle(seed, new permutation every epoch)--repeat--> global stream g = 0, 1, 2, ...
      (mixture: every component shuffled and repeated on its own, then interleaved by weight)
    host i of n, batch b per host: rows [i*b, (i+1)*b) of every global batch of n*b records, i.e.
    g = position + i*b + (0 .. b-1), then position + n*b + i*b + (0 .. b-1), ...
    --map(decode + preprocess + tokenize) in ``num_workers`` spawned processes (mp_prefetch)-->
    --main process: drop and count skipped records, stack ``batch_size`` samples--> host batch

The global stream is a pure function of (sources, seed), so

* hosts read disjoint samples whose union is the whole stream (each epoch exactly once when the
  data set is not a mixture);
* without bad records the global batch of step t is ``g = t*G .. (t+1)*G - 1`` (G = n*b) for every
  host count, so a run on n hosts trains on exactly the batches of a run on one host;
* the output does not depend on ``num_workers`` (the workers' results are re-interleaved in order,
  and records are filtered after the workers, not in them);
* random choices inside transforms are seeded by (seed, stream index), never by worker or host;
* the iterator state is one number, ``position`` (where this host's slice continues), plus the skip
  counters: a small JSON dict (save it per process, e.g. ``orbax.checkpoint.args.JsonSave``).
  ``set_state`` rebuilds the pipeline from there, so a restore gives exactly the batches an
  uninterrupted run would have produced.

**When the number of hosts changes** (a restore with a different ``process_count``): each host takes
its rows of the global batches from ``position`` on, in the new layout. The global order and the epoch
are kept; because different hosts skip different numbers of bad records, the saved positions of the
old hosts differ by at most ``old_count * skipped``, so that many samples around the boundary may be
read twice or not at all. Any old host's state can be given to any new host (Orbax saves one per process; a new
host without its own file may use process 0's). Batches per step stay ``global_batch_size``; only the
per-host share changes.

**The validation split** (``make_eval_iterator``): ``data.eval_paths`` (read once, in one pass), or
``data.eval_holdout`` = the last N records of the (single) training source, which ``make_iterator``
then leaves out (``holdout_split``), so training never sees them. Its global batches are a pure
function of the files and ``data.seed`` too, so validation sees the same batches on any host count.

``DataIterator`` also owns the ``DataCounters`` (samples and skips per reason, for this host) that the
trainer adds to its metrics; a data set in which a whole epoch's worth of consecutive records is bad
raises ``DataError``. ``place_batch`` turns host batches into global arrays sharded over the batch axis.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from blip3o_jax.data import samples as samples_lib
from blip3o_jax.data import sources as sources_lib
from blip3o_jax.data import synthetic
from blip3o_jax.data.sources import DataError, PrecomputedSource

_MAX_WARNINGS = 20


class DataCounters:
    """Samples produced and records skipped per reason (``samples.BAD_IMAGE``, ...), plus problems
    found when the sources were opened (``empty_shard``). ``metrics()`` is what the trainer logs."""

    def __init__(self, initial: dict[str, int] | None = None):
        self.skipped: collections.Counter[str] = collections.Counter(initial or {})
        self.samples = 0

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        out = {f"{prefix}samples": self.samples, f"{prefix}skipped": sum(self.skipped.values())}
        out.update({f"{prefix}skipped_{reason}": n for reason, n in sorted(self.skipped.items())})
        return out

    def state(self) -> dict:
        return {"samples": self.samples, "skipped": dict(self.skipped)}

    def load(self, state: dict) -> None:
        self.samples = int(state.get("samples", 0))
        self.skipped = collections.Counter({k: int(v) for k, v in state.get("skipped", {}).items()})


def _with_stream_index(index: int, record: dict) -> dict:
    # Transforms seed their random choices with (seed, stream_index): independent of hosts, workers
    # and restarts, so a restored run makes the same choices.
    return {**record, "stream_index": index}


def global_stream(sources: Sequence[tuple[Any, float]], *, seed: int,
                  num_epochs: int | None = None) -> grain.MapDataset:
    """The shuffled, repeated global record stream (see the module docstring)."""
    if len(sources) == 1:
        ds = grain.MapDataset.source(sources[0][0]).shuffle(seed=seed).repeat(num_epochs)
    elif num_epochs is not None:
        raise ValueError("a mixture has no epochs: pass num_epochs=None")
    else:
        parts = [grain.MapDataset.source(src).shuffle(seed=(seed + 1000 * i) % 2**32).repeat(None)
                 for i, (src, _) in enumerate(sources)]
        ds = grain.MapDataset.mix(parts, weights=[w for _, w in sources])
    return ds.map_with_index(_with_stream_index)


class HostRows(grain.MapDataset):
    """Host ``index`` of ``count``'s share of a stream, from its ``start``-th record on: rows
    [index*rows, (index+1)*rows) of every global batch of count*rows consecutive records."""

    def __init__(self, parent: grain.MapDataset, *, start: int, index: int, count: int, rows: int):
        super().__init__(parent)
        self._start, self._index, self._count, self._rows = start, index, count, rows
        full, rest = divmod(len(parent), count * rows)  # a finite stream may end inside a global batch
        self._length = max(full * rows + min(rows, max(0, rest - index * rows)) - start, 0)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(self._start + index, self._rows)
        return self._parent[(batch * self._count + self._index) * self._rows + row]

    def __str__(self) -> str:
        return f"HostRows(start={self._start}, index={self._index}, count={self._count}, rows={self._rows})"


class DataIterator:
    """Host batches (dicts of numpy arrays with a leading ``batch_size`` axis) from the global stream.

    ``transform`` maps a raw record to a sample dict of fixed-shape arrays or ``samples.skip(reason)``;
    it runs in ``num_workers`` worker processes (0 = in this process) and must be picklable.
    """

    def __init__(self, sources: Sequence[tuple[Any, float]], transform: Callable[[dict], dict], *, batch_size: int,
                 seed: int = 0, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                 num_epochs: int | None = None, read_threads: int = 2, with_keys: bool = False):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.sources = list(sources)
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.num_workers, self.num_epochs = num_workers, num_epochs
        self.read_threads, self.with_keys = read_threads, with_keys
        problems: collections.Counter[str] = collections.Counter()
        for src, _ in self.sources:
            problems.update(getattr(src, "problems", {}))
        self.counters = DataCounters(problems)
        # A whole epoch of consecutive bad records means nothing in the data set is usable.
        self._bad_limit = max(sum(len(s) for s, _ in self.sources) // process_count, 1) + 1
        self._stream = global_stream(self.sources, seed=seed, num_epochs=num_epochs)
        self._position = 0  # records read by this host x process_count (= the global position without skips)
        self._iter = None
        self._warned = 0

    # -- state -------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """JSON-serialisable; restore with ``set_state`` (also with a different host count)."""
        return {"position": self._position, "seed": self.seed, "process_count": self.process_count,
                "process_index": self.process_index, "counters": self.counters.state()}

    def set_state(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this pipeline uses {self.seed}")
        if state.get("process_count", self.process_count) != self.process_count:
            logging.warning("data: restoring a %d-host data position on %d hosts; samples near the boundary "
                            "may repeat or be missed (see blip3o_jax.data.pipeline)",
                            state["process_count"], self.process_count)
        self.close()
        self._position = int(state["position"])
        self.counters.load(state.get("counters", {}))

    # -- iteration ---------------------------------------------------------------------------

    def _open(self):
        ds = HostRows(self._stream, start=self._position // self.process_count, index=self.process_index,
                      count=self.process_count, rows=self.batch_size)
        ds = ds.map(self.transform)
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                  prefetch_buffer_size=max(2 * self.batch_size, self.read_threads)))
        if self.num_workers > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers,
                                                             per_worker_buffer_size=self.batch_size))
        return iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iter is None:
            self._iter = self._open()
        batch, consecutive_bad = [], 0
        while len(batch) < self.batch_size:
            try:
                element = next(self._iter)
            except StopIteration:
                if self.counters.samples == 0 and not batch:
                    raise DataError("the data set produced no valid sample: "
                                    f"{self.counters.metrics()}") from None
                raise  # the partial last batch of a finite run is dropped (fixed shapes)
            self._position += self.process_count
            if samples_lib.is_skip(element):
                reason = element[samples_lib.SKIP_KEY]
                self.counters.skipped[reason] += 1
                consecutive_bad += 1
                if self._warned < _MAX_WARNINGS:
                    self._warned += 1
                    logging.warning("data: skipped %s (%s)%s", element.get("key"), reason,
                                    "; further skips are only counted" if self._warned == _MAX_WARNINGS else "")
                if consecutive_bad >= self._bad_limit:
                    raise DataError(f"{consecutive_bad} consecutive records were unusable (more than this host's "
                                    f"share of an epoch); nothing valid in the data set? {self.counters.metrics()}")
                continue
            consecutive_bad = 0
            self.counters.samples += 1
            batch.append(element)
        keys = [e.pop("key", None) for e in batch]
        out = {name: np.stack([e[name] for e in batch]) for name in sorted(batch[0])}
        if self.with_keys:
            out["key"] = np.asarray(keys)
        return out

    def close(self) -> None:
        if self._iter is not None and hasattr(self._iter, "close"):
            self._iter.close()
        self._iter = None


# ---------------------------------------------------------------------------------------------
# From the config


def make_transform(config, tokenizer, kind: str, *, und_image_size: int = 448, max_patches: int | None = None,
                   min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 16384, caption_question: str | None = None,
                   max_turns: int | None = None):
    """The worker-side transform for ``kind`` in ("generation", "understanding") from config.data/model."""
    ids = samples_lib.SpecialIds.from_config(config.model)
    if kind == "generation":
        return samples_lib.GenerationTransform(tokenizer, max_length=config.data.max_length,
                                               n_query=config.model.n_query, image_size=config.data.image_size,
                                               target_encoder=config.model.target_encoder, ids=ids,
                                               use_condition=config.data.precomputed_condition,
                                               prompt=config.data.generation_prompt)
    if kind == "understanding":
        return samples_lib.UnderstandingTransform(tokenizer, max_length=config.data.max_length,
                                                  image_size=und_image_size, max_patches=max_patches,
                                                  min_pixels=min_pixels, max_pixels=max_pixels,
                                                  caption_question=caption_question, max_turns=max_turns,
                                                  seed=config.data.seed, ids=ids)
    raise ValueError(f"unknown sample kind {kind!r}; allowed: 'generation', 'understanding'")


def config_sources(config, *, data_dir: str | None = None, cache_dir: str | None = None) -> list[tuple[Any, float]]:
    """The sources ``config.data`` names: the synthetic demo set (written into ``data_dir`` if missing),
    or ``config.data.paths`` (files, globs, ``tfds:NAME:SPLIT``, ``A@w;B@w`` mixtures)."""
    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    if config.data.source == "synthetic" and not config.data.paths:
        if data_dir is None:
            raise ValueError("config.data.source='synthetic' needs a data_dir to write the demo shards into")
        paths, _ = synthetic.prepare_demo_data(data_dir, image_size=config.data.image_size, seed=config.data.seed)
        return [(sources_lib.WebDatasetSource(paths, **kwargs), 1.0)]
    sources = sources_lib.open_sources(config.data.paths, **kwargs)
    check_precomputed(config, sources)
    return sources


def check_precomputed(config, sources: Sequence[tuple[Any, float]]) -> None:
    """Precomputed feature directories (blip3o_jax.precompute) must fit the model being trained, and a
    mixture is either all precomputed or all raw (batches need the same fields)."""
    pre = [src for src, _ in sources if isinstance(src, PrecomputedSource)]
    if not pre:
        if config.data.precomputed_condition:
            raise DataError("config.data.precomputed_condition needs data.paths naming precompute output directories")
        return
    if len(pre) != len(sources):
        raise DataError("config.data.paths mixes precomputed feature directories with raw data; "
                        "precompute every component (python -m blip3o_jax.precompute)")
    # Deliberately lazy: configlib imports the models (jax); Grain workers import this module and must not.
    from blip3o_jax import configlib

    m = config.model
    section, head = configlib.head_section(config), configlib.head_config(config)
    want = (head.num_tokens, head.in_channels)
    for src in pre:
        if src.feature_shape != want:
            raise DataError(f"{src.directory}: stored target features {src.feature_shape} do not fit this model's "
                            f"head: (target tokens of model.{section}, model.{section}.in_channels) = {want}")
        stored = src.manifest["encoder"]["target_encoder"]
        if m.target_encoder not in ("none", stored):
            raise DataError(f"{src.directory} holds {stored} features but config.model.target_encoder is "
                            f"{m.target_encoder!r} (set it to {stored!r} or 'none')")
        if config.data.precomputed_condition and src.condition_shape != (m.n_query, m.llm.hidden_size):
            raise DataError(f"config.data.precomputed_condition: {src.directory} stores condition states "
                            f"{src.condition_shape}, this model needs {(m.n_query, m.llm.hidden_size)} "
                            "(precompute with precompute.with_condition=True)")


class RecordRange:
    """Records ``[start, stop)`` of a random-access source (``holdout_split``); picklable like it."""

    def __init__(self, source, start: int, stop: int, problems: dict | None = None):
        self.source, self.start, self.stop = source, start, stop
        self.problems = dict(problems or {})

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.source[self.start + index]


class Concatenation:
    """Several random-access sources read one after the other (the files of ``data.eval_paths``)."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
        self.problems: collections.Counter[str] = collections.Counter()
        for src in self.sources:
            self.problems.update(getattr(src, "problems", {}))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[i][index - int(self.offsets[i])]


def holdout_split(sources: Sequence[tuple[Any, float]], n: int) -> tuple[RecordRange, RecordRange]:
    """(training records, the last ``n`` records) of a single source (``data.eval_holdout``)."""
    if len(sources) != 1:
        raise DataError(f"config.data.eval_holdout: the training data is a mixture of {len(sources)} sources, so "
                        "'its last N records' names no one split; set data.eval_paths to the validation files")
    src = sources[0][0]
    if not 0 < n < len(src):
        raise DataError(f"config.data.eval_holdout = {n} must be below the {len(src)} records of the training data")
    return (RecordRange(src, 0, len(src) - n, getattr(src, "problems", {})), RecordRange(src, len(src) - n, len(src)))


def make_iterator(config, tokenizer, kind: str, sources: Sequence[tuple[Any, float]] | None = None, *,
                  process_index: int | None = None, process_count: int | None = None, num_epochs: int | None = None,
                  data_dir: str | None = None, cache_dir: str | None = None, **transform_kwargs) -> DataIterator:
    """The host iterator for a training run over ``sources`` (default: ``config_sources(config)``); the
    host slice comes from jax.process_index()/process_count() unless passed in."""

    if process_index is None or process_count is None:
        import jax  # deliberately lazy: Grain workers import this module (HostRows) and must not load jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if config.data.global_batch_size % process_count:
        raise ValueError(f"config.data.global_batch_size {config.data.global_batch_size} is not divisible "
                         f"by the {process_count} processes")
    if sources is None:
        sources = config_sources(config, data_dir=data_dir, cache_dir=cache_dir or config.data.cache_dir or None)
    if config.data.eval_holdout:  # the validation split is never trained on
        sources = [(holdout_split(sources, config.data.eval_holdout)[0], 1.0)]
    if kind == "understanding":
        d = config.data
        defaults = dict(und_image_size=d.und_image_size, max_patches=d.max_patches or None, min_pixels=d.min_pixels,
                        max_pixels=d.max_pixels, max_turns=d.max_turns or None)
        transform_kwargs = {**defaults, **transform_kwargs}
    return DataIterator(sources, make_transform(config, tokenizer, kind, **transform_kwargs),
                        batch_size=config.data.global_batch_size // process_count, seed=config.data.seed,
                        process_index=process_index, process_count=process_count,
                        num_workers=config.data.num_workers, num_epochs=num_epochs)


def make_eval_iterator(config, tokenizer, kind: str = "generation", sources: Sequence[tuple[Any, float]] | None = None,
                       *, process_index: int | None = None, process_count: int | None = None,
                       data_dir: str | None = None, cache_dir: str | None = None) -> DataIterator | None:
    """This host's rows of the validation split's global batches, one pass (None without a split):
    ``data.eval_paths``, else the last ``data.eval_holdout`` records of ``sources`` (default: the
    config's training sources). ``it.set_state(start)`` with ``start = it.get_state()`` taken before the
    first read rewinds it for the next validation; the last partial global batch is not read."""
    if process_index is None or process_count is None:
        import jax  # deliberately lazy, as in make_iterator

        process_index, process_count = jax.process_index(), jax.process_count()
    cache_dir = cache_dir or config.data.cache_dir or None
    if config.data.eval_paths:
        components = sources_lib.open_sources(config.data.eval_paths, **({"cache_dir": cache_dir} if cache_dir else {}))
        check_precomputed(config, components)
        held_out = Concatenation([src for src, _ in components])
    elif config.data.eval_holdout:
        if sources is None:
            sources = config_sources(config, data_dir=data_dir, cache_dir=cache_dir)
        held_out = holdout_split(sources, config.data.eval_holdout)[1]
    else:
        return None
    rows = config.data.global_batch_size // process_count
    if len(held_out) < config.data.global_batch_size:
        raise DataError(f"the validation split has {len(held_out)} records, fewer than one global batch "
                        f"(data.global_batch_size {config.data.global_batch_size}): set data.eval_paths / "
                        "data.eval_holdout to more")
    return DataIterator([(held_out, 1.0)], make_transform(config, tokenizer, kind), batch_size=rows,
                        seed=config.data.seed, process_index=process_index, process_count=process_count,
                        num_workers=config.data.num_workers, num_epochs=1)


def place_batch(batch: dict[str, np.ndarray], mesh, rules=None) -> dict:
    """Host batch -> global arrays sharded along the batch axis (non-numeric entries are dropped).

    Every process passes its own host batch; the global batch is their concatenation in process order.
    """
    from blip3o_jax import sharding  # deliberately lazy, as above: sharding imports jax

    numeric = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
    if rules is None:
        return sharding.shard_host_batch(numeric, mesh)
    return sharding.shard_host_batch(numeric, mesh, rules)


def load_tokenizer(config, data_dir: str | None = None):
    """The tokenizer ``config.data.tokenizer`` names (a tokenizer.json file or a local Hugging Face
    tokenizer folder); for the synthetic demo set without one, the demo's own tokenizer."""
    path = config.data.tokenizer
    if path:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast  # lazy: seconds to import

        if path.endswith(".json"):
            return PreTrainedTokenizerFast(tokenizer_file=path)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if config.data.source == "synthetic" and not config.data.paths:
        if data_dir is None:
            raise ValueError("the synthetic demo tokenizer needs a data_dir")
        return synthetic.prepare_demo_data(data_dir, image_size=config.data.image_size, seed=config.data.seed)[1]
    raise ValueError("config.data.tokenizer: set a local tokenizer.json or tokenizer folder (e.g. the checkpoint's)")
