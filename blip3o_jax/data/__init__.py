"""Input pipeline: data sources, sample construction, the Grain pipeline and the synthetic demo set.

- ``sources``: random-access sources yielding raw records (webdataset tar shards through a cached
  member index, ArrayRecord files, TFDS ``data_source``) and the spec parser for weighted mixtures.
- ``samples``: reference sample construction (generation prompts with the query slots, understanding
  conversations with image-pad tokens) and the decode + preprocess transforms run in worker processes.
- ``pipeline``: per-host sharding, seeded per-epoch shuffling, batching to fixed shapes, skip counters,
  checkpointable iterator state, and placement of host batches as global arrays.
- ``synthetic``: the demo's coloured-shape data set (real tar shards) and its tiny BPE tokenizer.
- ``benchmark``: decode + preprocess throughput, ``python -m blip3o_jax.data.benchmark``.

Nothing here imports jax at module level: Grain's worker processes are spawned and import these
modules, so they must stay cheap to import.
"""
