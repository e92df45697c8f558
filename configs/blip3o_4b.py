"""BLIP3-o 4B: generation pre-training of the released 4B model (Qwen2.5-VL-3B backbone, frozen).

    python -m blip3o_jax.train --config configs/blip3o_4b.py --workdir gs://BUCKET/blip3o_4b \
        --config.train.init_from=/path/to/converted/Qwen2.5-VL-3B-or-BLIP3o-4B \
        --config.data.source=webdataset --config.data.paths='/data/BLIP3o-Pretrain-*/*.tar'

Same recipe as the 8B (docs/model.md 11); the backbone is Qwen2.5-VL-3B-Instruct (width 2048,
36 layers, tied embeddings) so the DiT caption input width is 2048. Argument `:sft` = instruction tuning.
"""

from blip3o_jax import configlib


def get_config(arg: str | None = None):
    c = configlib.base_config()
    llm = c.model.llm
    llm.hidden_size = 2048
    llm.intermediate_size = 11008
    llm.num_hidden_layers = 36
    llm.num_attention_heads = 16
    llm.num_key_value_heads = 2
    llm.tie_word_embeddings = True
    c.model.vision.out_hidden_size = 2048
    c.model.dit.latent_embedding_size = 2048
    if arg == "sft":
        c.train.stage = "instruction"
        c.train.schedule = "cosine"
        c.train.min_learning_rate = 0.0
        c.train.num_steps = 10_000
    elif arg:
        raise ValueError(f"configs/blip3o_4b.py: unknown argument {arg!r}; allowed: '', 'sft'")
    return c
