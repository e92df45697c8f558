"""BLIP3-o 8B: generation pre-training of the released 8B model (Qwen2.5-VL-7B backbone, frozen).

    python -m blip3o_jax.train --config configs/blip3o_8b.py --workdir gs://BUCKET/blip3o_8b \
        --config.train.init_from=/path/to/converted/Qwen2.5-VL-7B-or-BLIP3o-8B \
        --config.data.source=webdataset --config.data.paths='/data/BLIP3o-Pretrain-*/*.tar'

Recipe (docs/model.md 11): global batch 512, AdamW lr 1e-4 with linear warmup over 0.3% of the
steps then cosine to 1e-5, weight decay 0, gradient clipping 1.0, bfloat16 compute with float32 master
weights, >= 150k steps from scratch. Only the DiT head (1.365 B) and the 64 queries train.
Argument: `:sft` switches to instruction tuning on BLIP3o-60k (cosine to 0, 10k steps).
"""

from blip3o_jax import configlib


def get_config(arg: str | None = None):
    c = configlib.base_config()  # defaults are the released 8B sizes and the stage-1 recipe
    if arg == "sft":
        c.train.stage = "instruction"
        c.train.schedule = "cosine"
        c.train.min_learning_rate = 0.0
        c.train.num_steps = 10_000
    elif arg:
        raise ValueError(f"configs/blip3o_8b.py: unknown argument {arg!r}; allowed: '', 'sft'")
    return c
