"""Precomputed target features: the CLI writes sharded ArrayRecord files and a manifest, an interrupted
run resumes to identical files, and training on the stored features gives the on-the-fly loss."""

import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from blip3o_jax.models import blip3o as model_lib
from blip3o_jax import precompute as precompute_lib
from blip3o_jax import sharding
from blip3o_jax.data import pipeline, samples, sources, synthetic
from tests.references.configs import demo_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHUNK = 6  # 15 records -> chunks of 6, 6, 3; each one padded batch of 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    shards = synthetic.write_synthetic_shards(str(root / "shards"), num_samples=13, samples_per_shard=7, seed=5)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(buf, format="PNG")
    bad = str(root / "shards" / "bad.tar")  # one undecodable image, one record without caption
    sources.write_tar_shard(bad, [{"__key__": "broken", "png": b"not a png", "txt": "a red circle on the left"},
                                  {"__key__": "nocaption", "png": buf.getvalue()}])
    tok_dir = str(root / "tokenizer")
    tokenizer = synthetic.train_demo_tokenizer(tok_dir)
    overrides = {"data.paths": ",".join(shards + [bad]), "data.tokenizer": tok_dir, "data.source": "webdataset",
                 "data.global_batch_size": 8, "precompute.records_per_shard": CHUNK,
                 "precompute.with_condition": True, "train.stage": "generation"}
    return {"root": root, "overrides": overrides, "cfg": demo_config(**overrides), "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def model(setup):
    return model_lib.build_model(setup["cfg"], sharding.make_mesh(setup["cfg"].mesh))


@pytest.fixture(scope="module")
def cli_out(setup):
    """The command itself, in a fresh process (8 fake CPU devices, as the tests)."""
    out = setup["root"] / "cli"
    args = [sys.executable, "-m", "blip3o_jax.precompute", "--config", "configs/demo.py:smoke", "--out", str(out)]
    args += [f"--config.{k}={v}" for k, v in setup["overrides"].items()]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def shard_files(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".array_record"))


def test_cli_writes_shards_and_manifest(cli_out, setup):
    manifest = json.loads((cli_out / "manifest.json").read_text())
    assert shard_files(cli_out) == [precompute_lib.shard_name(c, 3) for c in range(3)]
    assert manifest["counts"] == {"records": 15, "samples": 13, "skipped": 2,
                                  "skipped_by_reason": {samples.BAD_IMAGE: 1, samples.MISSING_CAPTION: 1}}
    cfg = setup["cfg"]
    assert manifest["features"] == {"shape": [cfg.model.dit.input_size ** 2, cfg.model.eva.width], "dtype": "float32"}
    assert manifest["condition"]["shape"] == [cfg.model.n_query, cfg.model.llm.hidden_size]
    assert manifest["encoder"]["target_encoder"] == "eva_clip" and manifest["encoder"]["config"]["width"] == 64
    assert [s["records"] for s in manifest["shards"]] == [6, 6, 3]
    src = sources.PrecomputedSource(str(cli_out))
    assert len(src) == 13
    rec = src[0]
    assert rec["target_features"].shape == (16, 64) and rec["condition"].shape == (cfg.model.n_query, 64)
    assert rec["caption"] and rec["meta"]["objects"]


def test_resume_after_interruption_gives_identical_files(cli_out, setup, model):
    out = setup["root"] / "resumed"
    cfg = setup["cfg"]
    kw = dict(model=model, tokenizer=setup["tokenizer"], progress=False)
    assert precompute_lib.precompute(cfg, str(out), stop_after_chunks=1, **kw) is None  # "killed" after a chunk
    assert shard_files(out) == [precompute_lib.shard_name(0, 3)] and not (out / "manifest.json").exists()
    first = out / precompute_lib.shard_name(0, 3)
    mtime = first.stat().st_mtime_ns
    (out / (precompute_lib.shard_name(1, 3) + ".tmp999")).write_bytes(b"half a file")  # the interrupted write
    manifest = precompute_lib.precompute(cfg, str(out), **kw)
    assert first.stat().st_mtime_ns == mtime  # done chunks are not recomputed
    assert manifest == json.loads((cli_out / "manifest.json").read_text())
    for name in shard_files(cli_out):
        assert (out / name).read_bytes() == (cli_out / name).read_bytes(), name
    # A different encoder setting in the same directory is refused, not mixed in.
    other = demo_config(**{**setup["overrides"], "precompute.feature_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="feature_dtype"):
        precompute_lib.precompute(other, str(out), **kw)


@pytest.mark.parametrize("use_condition", [False, True])
def test_training_on_stored_features_gives_the_on_the_fly_loss(cli_out, setup, model, use_condition):
    cfg, tok = setup["cfg"], setup["tokenizer"]
    pre_cfg = demo_config(**{**setup["overrides"], "data.paths": str(cli_out), "data.source": "precomputed",
                             "data.precomputed_condition": use_condition})
    pre_sources = pipeline.config_sources(pre_cfg)
    it = pipeline.DataIterator(pre_sources, pipeline.make_transform(pre_cfg, tok, "generation"), batch_size=8,
                               seed=0, num_epochs=1, with_keys=True)
    pre = next(it)
    it.close()
    assert "target_image" not in pre and pre["target_features"].shape == (8, 16, 64)
    assert ("condition" in pre) == use_condition

    # The same samples read raw from the tar shards, through the training transform.
    raw_src = sources.open_source(cfg.data.paths)
    by_key = {raw_src[i]["key"]: i for i in range(len(raw_src))}
    transform = pipeline.make_transform(cfg, tok, "generation")
    rows = [transform(raw_src[by_key[str(k)]]) for k in pre["key"]]
    raw = {name: np.stack([r[name] for r in rows]) for name in rows[0] if name != "key"}
    np.testing.assert_array_equal(raw["input_ids"], pre["input_ids"])

    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, batch):
        return nnx.merge(graphdef, state).generation_loss(batch, jax.random.key(3))[0]

    numeric = lambda b: {k: v for k, v in b.items() if k != "key"}
    want = float(loss(state, numeric(raw)))
    got = float(loss(state, numeric(pre)))
    np.testing.assert_allclose(got, want, rtol=2e-6)
    feats = jax.jit(lambda s, x: nnx.merge(graphdef, s).target_features(x))(state, raw["target_image"])
    # The CLI ran the encoder in another process at another batch size (other XLA fusions): float32
    # rounding, so the project's usual tolerance, rtol 1e-5 and atol 1e-5 x max|reference|.
    feats = np.asarray(feats)
    np.testing.assert_allclose(pre["target_features"], feats, rtol=1e-5, atol=1e-5 * np.abs(feats).max())


def test_precomputed_data_must_fit_the_model(cli_out, setup):
    wrong = demo_config(**{**setup["overrides"], "data.paths": str(cli_out), "model.dit.in_channels": 32,
                           "model.eva.width": 32})
    with pytest.raises(sources.DataError, match="model.dit.in_channels"):
        pipeline.config_sources(wrong)
    unfinished = setup["root"] / "unfinished"
    unfinished.mkdir()
    with pytest.raises(sources.DataError, match="manifest.json"):
        sources.open_source(str(unfinished))


@pytest.mark.slow
def test_two_processes_write_disjoint_chunks_with_the_same_content(cli_out, setup):
    """2 JAX processes x 2 CPU devices (gloo): each writes its own chunks; together they equal the
    one-process output (same keys in the same order, same features to float32 rounding)."""
    import socket

    out = setup["root"] / "two_processes"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "blip3o_jax.precompute", "--config", "configs/demo.py:smoke", "--out", str(out)]
    args += [f"--config.{k}={v}" for k, v in {**setup["overrides"], "mesh.data": 2, "mesh.fsdp": 2}.items()]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   JAX_ENABLE_COMPILATION_CACHE="false")  # see tests/test_multihost.py
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert shard_files(out) == shard_files(cli_out)
    by_process = [json.loads((out / f.replace(".array_record", ".json")).read_text()) for f in shard_files(out)]
    assert [(s["chunk"], s["process_index"]) for s in by_process] == [(0, 0), (1, 1), (2, 0)]
    assert json.loads((out / "manifest.json").read_text())["counts"] == \
        json.loads((cli_out / "manifest.json").read_text())["counts"]
    got, want = sources.PrecomputedSource(str(out)), sources.PrecomputedSource(str(cli_out))
    for i in range(len(want)):
        assert got[i]["key"] == want[i]["key"]
        np.testing.assert_allclose(got[i]["target_features"], want[i]["target_features"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[i]["condition"], want[i]["condition"], rtol=1e-5, atol=1e-6)
