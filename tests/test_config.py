"""Config files load and validate; bad keys, types and values fail naming the key."""

import pathlib
import subprocess
import sys

import pytest

from blip3o_jax import configlib
from tests.references.configs import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,arg", [("demo", None), ("demo", "smoke"), ("blip3o_8b", None),
                                      ("blip3o_8b", "sft"), ("blip3o_4b", None), ("blip3o_4b", "sft")])
def test_configs_validate(name, arg):
    cfg = load_config(name, arg)
    configlib.validate(cfg, num_devices=8)
    doc = (ROOT / "configs" / f"{name}.py").read_text().split('"""')[1]
    assert doc.lstrip().splitlines()[0].strip()  # summary line
    assert "python -m blip3o_jax.train --config configs/" in doc  # docstring gives the command


def test_released_sizes():
    c8, c4 = load_config("blip3o_8b"), load_config("blip3o_4b")
    assert (c8.model.llm.hidden_size, c4.model.llm.hidden_size) == (3584, 2048)
    assert c4.model.llm.tie_word_embeddings and not c8.model.llm.tie_word_embeddings
    assert c8.model.dit.dim == c4.model.dit.dim == 1792
    assert c8.model.dit.latent_embedding_size == 3584 and c4.model.dit.latent_embedding_size == 2048
    assert c8.model.llm.vocab_size == 151668 and c8.model.n_query == 64
    assert c8.data.global_batch_size == 512 and c8.train.learning_rate == 1e-4 and c8.train.grad_clip == 1.0


def test_unknown_key_in_config_file_names_it():
    cfg = configlib.base_config()
    with pytest.raises(AttributeError, match="n_querys"):
        cfg.model.n_querys = 3


def test_validate_unknown_key_lists_allowed():
    cfg = configlib.base_config()
    cfg.unlock()
    cfg.model.dit.n_layer = 3
    with pytest.raises(configlib.ConfigError, match=r"'model\.dit\.n_layer'.*n_layers"):
        configlib.validate(cfg)


@pytest.mark.parametrize(
    "key,value,pattern",
    [
        ("model.dit.n_heads", 5, r"'model\.dit\.n_heads'.*do not divide dim 1792"),
        ("model.llm.num_key_value_heads", 3, r"'model\.llm\.num_key_value_heads'"),
        ("model.gen_head", "gan", r"'model\.gen_head'.*\['flow', 'mse'\]"),
        ("model.dtype", "float64", r"'model\.dtype'.*bfloat16"),
        ("sharding.dit", "zero3", r"'sharding\.dit'.*fsdp"),
        ("model.dit.in_channels", 1024, r"'model\.dit\.in_channels'.*eva\.width"),
        ("flow.cond_dropout", 1.5, r"'flow\.cond_dropout'"),
        ("demo.generation_learning_rate", 0.0, r"'demo\.generation_learning_rate'.*> 0"),
    ],
)
def test_bad_values_name_the_key(key, value, pattern):
    cfg = configlib.base_config()
    section, leaf = key.rsplit(".", 1)
    node = cfg
    for part in section.split("."):
        node = node[part]
    node[leaf] = value
    with pytest.raises(configlib.ConfigError, match=pattern):
        configlib.validate(cfg)


def test_wrong_type_names_the_key():
    cfg = configlib.base_config()
    cfg.unlock()
    with cfg.ignore_type():
        cfg.model.dit.n_layers = "24"
    with pytest.raises(configlib.ConfigError, match=r"'model\.dit\.n_layers'.*expected int"):
        configlib.validate(cfg)


def test_mesh_must_match_devices():
    cfg = configlib.base_config()
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=1))
    with pytest.raises(configlib.ConfigError, match="needs 4 devices, but 8"):
        configlib.validate(cfg, num_devices=8)
    cfg.mesh.update(dict(data=-1, fsdp=2, tensor=2))
    configlib.validate(cfg, num_devices=8)
    cfg.mesh.update(dict(data=-1, fsdp=3, tensor=1))
    with pytest.raises(configlib.ConfigError, match="not divisible"):
        configlib.validate(cfg, num_devices=8)


def test_component_dataclass_roundtrip():
    cfg = load_config("demo")
    dit = configlib.component(cfg, "dit")
    assert dit.dim == 96 and isinstance(configlib.component(cfg, "llm").mrope_section, tuple)


def test_train_cli_help_and_bad_flag():
    out = subprocess.run([sys.executable, "-m", "blip3o_jax.train", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--workdir"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "blip3o_jax.train", "--config", "configs/demo.py:smoke",
                          "--workdir", "/nonexistent-unused", "--config.model.dit.n_layer=3"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0
    assert "n_layer" in bad.stderr
