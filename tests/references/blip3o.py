"""The tiny BLIP3-o checkpoint directory in the released layout (docs/model.md 10.1), assembled from the
random-weight references exactly as the real folder is laid out: transformers' Qwen2.5-VL saved with
``save_pretrained`` (4.51 key names) and a flat transformers-4.51 config.json, diffusers' Lumina DiT +
caption MLP under ``model.dit.model.``, timm's EVA in the released names with the fused qkv bias
[q, 0, v], ``model.latent_queries``, a leftover ``model.vae.*`` tensor, the ``dit_config`` /
``gen_vision_config`` size blocks, in several safetensors shards + index. Also a word-level tokenizer
on the tiny model's ids, and reading / writing such safetensors directories.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors import safe_open

from blip3o_jax import conversion, weights
from blip3o_jax.models import dit_mapping, eva_mapping
from blip3o_jax.models.dit import DiTConfig
from blip3o_jax.models.eva_clip import EvaConfig
from tests.references.dit import build_reference, reference_state_dict
from tests.references.eva import RELEASED_RATIO, released_state_dict, timm_eva
from tests.references.qwen import EOS, IMAGE, PAD, V_END, V_START, VIDEO, flat_config, tiny_hf

N_QUERY, GEN_START = 8, 104  # the tiny vocabulary has 128 ids (image / vision ids at 100-103)
DIT = DiTConfig(input_size=4, patch_size=1, in_channels=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                multiple_of=32, latent_embedding_size=64)
EVA = EvaConfig(image_size=64, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=RELEASED_RATIO,
                pooling="early_pool2d_2")


def read_dir(path) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def write_dir(path, tensors: dict, config: dict, shard_bytes: int = 256 << 10):
    weights.save_safetensors_sharded(iter(tensors.items()), path, max_shard_bytes=shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)


def released_checkpoint(tmp_path_factory) -> dict:
    """(PyTorch modules, the tensors, the config.json, the directory) of a tiny released-layout checkpoint."""
    qwen = tiny_hf(0, heads=4, kv_heads=2, layers=2, tied=False)
    qwen_dir = tmp_path_factory.mktemp("qwen_pretrained")
    qwen.save_pretrained(qwen_dir)  # transformers-5 save_pretrained writes the 4.51 key names
    tensors = read_dir(qwen_dir)
    assert "model.embed_tokens.weight" in tensors and "visual.merger.ln_q.weight" in tensors

    dit, cap = build_reference(DIT, seed=1)
    tensors.update(reference_state_dict(dit, cap))  # pad_token dropped, caption MLP under the prefix
    eva = timm_eva(EVA, seed=2)
    eva_sd = released_state_dict(eva.state_dict())
    eva_sd = {k: v.numpy() for k, v in eva_sd.items() if k.startswith(eva_mapping.RELEASED_PREFIX)}
    tensors.update(eva_sd)
    torch.manual_seed(3)
    queries = torch.randn(1, N_QUERY, 64)
    tensors["model.latent_queries"] = queries.numpy()
    tensors["model.vae.decoder.conv_in.weight"] = np.zeros((4, 16, 3, 3), np.float32)  # tolerated leftover

    config = flat_config(json.loads((qwen_dir / "config.json").read_text()))
    config.update(
        model_type="blip3o_qwen", n_query=N_QUERY, gen_start_token_id=GEN_START,
        gen_vision_tower="eva-clip-E-14-plus", gen_pooling=EVA.pooling,
        dit_config={k: getattr(DIT, k) for k in dit_mapping.JSON_FIELDS} | {"ffn_dim_multiplier": None},
        gen_vision_config={k: getattr(EVA, k) for k in conversion.EVA_JSON_FIELDS} | {"xattn": True},
    )
    path = tmp_path_factory.mktemp("blip3o_released")
    write_dir(path, tensors, config)
    assert os.path.exists(path / "model.safetensors.index.json") and len(list(path.glob("model-*"))) > 2
    return dict(qwen=qwen, dit=dit, cap=cap, eva=eva, queries=queries, tensors=tensors, config=config, path=path)


def tiny_tokenizer():
    """Word-level tokenizer filling the tiny model's 128 ids, Qwen special tokens at its ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"[UNK]": 0, "<|im_end|>": EOS, "<|endoftext|>": PAD, "<|im_start|>": 3, "<|image_pad|>": IMAGE,
                "<|video_pad|>": VIDEO, "<|vision_start|>": V_START, "<|vision_end|>": V_END, "[IMG]": GEN_START}
    words = ("system user assistant You are a helpful . Please generate image based on the following caption : "
             "red green blue circle square triangle What color is shape ? reconstruct given big small left right "
             "top bottom").split()
    free = [i for i in range(128) if i not in specials.values()]
    words = list(dict.fromkeys(words)) + [f"w{i}" for i in range(len(free))]
    vocab = dict(specials) | {w: i for w, i in zip(words, free)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
