"""Conversion of released-layout checkpoints that are not quite the released one (issue 20, items 7-9):
the target width from ``gen_hidden_size``, a DiT FFN built by the other width rule (checked against the
torch module that builds it), truncated safetensors files named before anything is read, no half-written
output after a failure, and the layer-sliced Orbax storage of stacked arrays (docs/model.md 10).

The tiny checkpoints are the ``released`` fixture (tests/references/blip3o.py) with tensors swapped for
the ones of an independent PyTorch module where a test needs it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from blip3o_jax import checkpoints, conversion, convert, weights
from blip3o_jax.models import dit_mapping
from blip3o_jax.models.dit import ffn_hidden_dim
from tests.references.blip3o import DIT, write_dir
from tests.references.dit import (
    build_reference,
    reference_state_dict,
    reference_velocity,
)


def _without_dit(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.startswith(dit_mapping.PREFIX)}


def _leftovers(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".partial" in n]


# ---------------------------------------------------------------------------------------------
# Item 7: config fields of the released checkpoint


def test_gen_hidden_size_is_the_target_width(released):
    hf = json.loads(json.dumps(released["config"]))
    del hf["dit_config"]["in_channels"]
    with pytest.raises(ValueError, match="in_channels.*1792 must equal model.eva.width 32"):
        conversion.config_from_hf(hf)  # neither field: the released width, not the tiny EVA's
    hf["gen_hidden_size"] = DIT.in_channels
    assert conversion.config_from_hf(hf).model.dit.in_channels == DIT.in_channels
    hf["dit_config"]["in_channels"] = DIT.in_channels
    assert conversion.config_from_hf(hf).model.dit.in_channels == DIT.in_channels  # agreeing: fine
    hf["gen_hidden_size"] = 48
    with pytest.raises(ValueError, match=r"gen_hidden_size = 48.*dit_config.in_channels = 32"):
        conversion.config_from_hf(hf)


def _four_d_reference(seed: int = 5):
    """The BLIP3-o repo's DiT block as it runs on diffusers >= 0.33: LuminaFeedForward is passed 4D and
    no longer applies 2/3, so every block's FFN is diffusers' LuminaFeedForward(dim, inner_dim=4 * dim)."""
    from diffusers.models.attention import LuminaFeedForward

    dit, cap = build_reference(DIT, seed=seed)
    torch.manual_seed(seed + 1)
    for block in dit.layers:
        block.feed_forward = LuminaFeedForward(dim=DIT.dim, inner_dim=4 * DIT.dim, multiple_of=DIT.multiple_of,
                                               ffn_dim_multiplier=DIT.ffn_dim_multiplier or None)
    return dit.eval(), cap


def test_dit_ffn_of_the_4d_rule_is_detected_and_matches_its_torch_module(released, tmp_path, caplog):
    dit, cap = _four_d_reference()
    width = dit.layers[0].feed_forward.linear_1.out_features
    assert width == 4 * DIT.dim != ffn_hidden_dim(DIT)  # 256 against the stock rule's 192
    write_dir(tmp_path, _without_dit(released["tensors"]) | reference_state_dict(dit, cap), released["config"])

    with caplog.at_level(logging.WARNING):
        model = convert.load_torch(tmp_path)
    assert model.cfg.head.ffn_rule == "4d" and ffn_hidden_dim(model.cfg.head) == width
    assert any("ffn_rule = '4d'" in r.getMessage() for r in caplog.records)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, DIT.num_tokens, DIT.in_channels)).astype(np.float32)
    z = rng.standard_normal((2, 5, DIT.latent_embedding_size)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    want = reference_velocity(dit, cap, DIT, x, t, z, (DIT.input_size, DIT.input_size))
    got = np.asarray(model.velocity(x, t, z))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())

    # The converted checkpoint stores the rule that builds it.
    cfg = convert.torch_to_orbax(tmp_path, tmp_path / "orbax", progress=False)
    assert cfg.model.dit.ffn_rule == "4d"
    assert checkpoints.read_config(tmp_path / "orbax").model.dit.ffn_rule == "4d"


def test_dit_ffn_of_neither_rule_names_both_shapes_and_the_fields(released, tmp_path):
    tensors = dict(released["tensors"])
    for i in range(DIT.n_layers):
        pre = f"{dit_mapping.PREFIX}layers.{i}.feed_forward."
        tensors[pre + "linear_1.weight"] = np.zeros((224, DIT.dim), np.float32)
        tensors[pre + "linear_3.weight"] = np.zeros((224, DIT.dim), np.float32)
        tensors[pre + "linear_2.weight"] = np.zeros((DIT.dim, 224), np.float32)
    write_dir(tmp_path, tensors, released["config"])
    with pytest.raises(ValueError, match=r"shape \(224, 64\).*expects \(192, 64\).*dit_config.multiple_of"):
        convert.load_torch(tmp_path)


# ---------------------------------------------------------------------------------------------
# Item 9: truncated files, staged output


def _truncated_copy(released, dst) -> tuple[str, str, int]:
    """A copy of the released checkpoint whose last shard lost its last 100 bytes: (file, its last tensor,
    its full size)."""
    shutil.copytree(released["path"], dst)
    shard = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))[-1]
    file = os.path.join(dst, shard)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size - 100)
    return file, last, size


def test_truncated_file_is_named_and_nothing_is_left(released, tmp_path):
    file, last, size = _truncated_copy(released, tmp_path / "broken")
    with pytest.raises(weights.TruncatedCheckpointError) as e:
        weights.TorchCheckpoint(tmp_path / "broken")
    msg = str(e.value)
    assert file in msg and repr(last) in msg and f"at least {size} bytes, found {size - 100}" in msg

    dst = tmp_path / "out"
    with pytest.raises(weights.TruncatedCheckpointError, match="truncated"):
        convert.main(["--src", str(tmp_path / "broken"), "--dst", str(dst)])
    assert not dst.exists() and _leftovers(tmp_path) == []

    # A header cut short is named too.
    with open(file, "r+b") as f:
        f.truncate(20)
    with pytest.raises(weights.TruncatedCheckpointError, match=r"header needs \d+ bytes, the file has 20"):
        weights.TorchCheckpoint(tmp_path / "broken")


def test_failure_mid_conversion_leaves_no_loadable_partial_checkpoint(released, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    calls = {"n": 0}
    real_get = weights.TorchCheckpoint.get

    def failing_get(self, key):
        calls["n"] += 1
        if calls["n"] == 40:  # after some Orbax partial saves and before the last
            raise OSError("simulated read failure")
        return real_get(self, key)

    monkeypatch.setattr(weights.TorchCheckpoint, "get", failing_get)
    with pytest.raises(OSError, match="simulated"):
        convert.main(["--src", str(released["path"]), "--dst", str(dst), "--group-bytes", str(100 << 10)])
    assert calls["n"] == 40
    assert not dst.exists() and _leftovers(tmp_path) == []

    # Into an existing, complete checkpoint: a failed run leaves it as it was (still whole and loadable).
    monkeypatch.setattr(weights.TorchCheckpoint, "get", real_get)
    convert.torch_to_orbax(released["path"], dst, progress=False)
    before = sorted(os.listdir(dst))
    calls["n"] = 0
    monkeypatch.setattr(weights.TorchCheckpoint, "get", failing_get)
    with pytest.raises(OSError, match="simulated"):
        convert.torch_to_orbax(released["path"], dst, progress=False, group_bytes=100 << 10)
    assert sorted(os.listdir(dst)) == before and _leftovers(tmp_path) == [] and _leftovers(dst) == []
    checkpoints.load_model(dst, mesh=conversion.host_mesh())


def test_export_failure_leaves_nothing(released, model_dir, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise OSError("simulated write failure")

    monkeypatch.setattr(weights, "save_safetensors_streamed", fail)
    with pytest.raises(OSError, match="simulated"):
        convert.main(["--src", str(model_dir), "--dst", str(tmp_path / "torch"), "--to", "torch"])
    assert not (tmp_path / "torch").exists() and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Item 8: stacked arrays stored one layer per chunk, read back one layer at a time


@pytest.fixture(scope="module")
def model_dir(released, tmp_path_factory):
    dst = tmp_path_factory.mktemp("converted") / "orbax"
    convert.torch_to_orbax(released["path"], dst, progress=False)
    return dst


def test_stacked_arrays_are_chunked_one_layer_per_chunk(model_dir):
    import tensorstore as ts

    params = os.path.join(model_dir, checkpoints.PARAMS_DIR)
    names = [k.decode()[: -len("/zarr.json")] for k in ts.KvStore.open({"driver": "ocdbt", "base": "file://" + params})
             .result().list().result() if k.endswith(b"/zarr.json")]
    # Scanned blocks: '<component>.layers.<param>' (a list index such as 'merger.mlp.layers.0' is not one).
    stacked = [n for n in names if re.search(r"\.(layers|blocks)\.[a-z]", n)]
    assert any(n.startswith("gen_head.dit.layers.") for n in stacked)
    assert any(n.startswith("backbone.model.layers.") for n in stacked), names
    for name in stacked:
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": "file://" + params,
                                                          "path": name}}).result()
        chunk = store.chunk_layout.write_chunk.shape
        assert chunk[0] == 1 and tuple(chunk[1:]) == tuple(store.shape[1:]), (name, chunk, store.shape)


def test_streamed_export_matches_the_safetensors_writer(released, model_dir, tmp_path):
    """--to torch reads one layer slice at a time and writes planned headers: the files read back with
    the safetensors library as the tensors of the source checkpoint."""
    convert.orbax_to_torch(model_dir, tmp_path / "torch", max_shard_bytes=100 << 10, progress=False)
    files = sorted(n for n in os.listdir(tmp_path / "torch") if n.endswith(".safetensors"))
    assert len(files) > 2 and os.path.exists(tmp_path / "torch" / "model.safetensors.index.json")
    seen = {}
    for name in files:
        with safe_open(str(tmp_path / "torch" / name), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            seen.update({k: f.get_tensor(k) for k in f.keys()})
    want = {k: v for k, v in released["tensors"].items() if not k.startswith("model.vae.")}
    assert seen.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(seen[k], v, err_msg=k)

    convert.orbax_to_torch(model_dir, tmp_path / "bf16", dtype="bfloat16", progress=False)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        key = dit_mapping.PREFIX + "layers.1.attn1.to_q.weight"
        np.testing.assert_array_equal(f.get_tensor(key).float().numpy(),
                                      torch.from_numpy(want[key]).bfloat16().float().numpy())
