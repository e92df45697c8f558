"""Samples during training (blip3o_jax/samples.py, train.sample_every): through the trainer CLI the grid
exists at every sampling step, is in TensorBoard, changes as the weights train, and is exactly what the
saved weights produce; with train.sample_decoder (the trained weights, an untrained tiny decoder) the grid
holds decoded pixels."""

from __future__ import annotations

import io
import json
import pathlib
import shutil
import struct

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboardX.proto import event_pb2

from blip3o_jax import checkpoints, configlib, samples, sharding
from blip3o_jax.data import synthetic
from blip3o_jax.decoder import scheduler
from blip3o_jax.decoder.pixel_decoder import Decoder
from blip3o_jax.decoder.unet import UNet2DConditionModel
from blip3o_jax.inference import Pipeline
from tests.references.configs import demo_config
from tests.references.trainer_cli import cli

PROMPTS = ("a red circle on the left", "a green triangle at the bottom", "a blue square at the top")
# Two sampling points of a short generation stage; a high learning rate so 2 steps visibly change the head.
OVERRIDES = {"train.stage": "generation", "train.num_steps": 4, "train.log_every": 2, "train.checkpoint_every": 4,
             "data.global_batch_size": 8, "train.learning_rate": 1e-2, "train.warmup_ratio": 0.0,
             "train.sample_every": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples_data")
    shards = synthetic.write_synthetic_shards(str(root / "shards"), num_samples=32, samples_per_shard=32)
    synthetic.train_demo_tokenizer(str(root / "tokenizer"))
    return {"data.paths": ",".join(shards), "data.tokenizer": str(root / "tokenizer"), "data.source": "webdataset"}


def tensorboard_images(workdir):
    """{(tag, step): encoded PNG} from the run's event files (TFRecord framing, tensorboardX's protos)."""
    out = {}
    for path in (pathlib.Path(workdir) / "tensorboard").glob("events.*"):
        raw = path.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("image"):
                    out[(v.tag, event.step)] = v.image.encoded_image_string
    return out


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A 4-step generation stage through the trainer CLI, sampling at steps 2 and 4 (no decoder)."""
    workdir = tmp_path_factory.mktemp("samples_run")
    prompts = "(" + ",".join(repr(p) for p in PROMPTS) + ",)"
    proc = cli(workdir, {**OVERRIDES, **data, "train.sample_prompts": prompts})
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    return workdir


@pytest.fixture(scope="module")
def finished(run, data):
    """(config, mesh, Pipeline) of the run's saved final weights."""
    cfg = demo_config(**{**OVERRIDES, **data, "train.sample_prompts": PROMPTS})
    mesh = sharding.make_mesh(cfg.mesh)
    return cfg, mesh, Pipeline.from_checkpoint(str(run), mesh=mesh, load_decoder_weights=False)


def test_grid_through_the_trainer_cli_changes_with_training(run):
    out = run / "samples"
    assert sorted(p.name for p in out.glob("*.png")) == ["2.png", "4.png"]
    assert json.loads((out / "prompts.json").read_text()) == list(PROMPTS)
    first, last = png(out / "2.png"), png(out / "4.png")
    t = samples.TILE
    assert first.shape == last.shape == (t, 3 * t + 2 * samples.GAP, 3)  # one row of three tiles
    tiles = [first[:, i * (t + samples.GAP):i * (t + samples.GAP) + t] for i in range(3)]
    assert len({tile.tobytes() for tile in tiles}) == 3  # each prompt its own picture
    assert tiles[0].std() > 10  # a picture, not a flat tile
    # Training moved the pictures: a clear share of the pixels changed between the two steps.
    assert np.mean(np.abs(first.astype(int) - last.astype(int)).max(-1) > 8) > 0.1
    assert (out / samples.PCA_FILE).exists()  # no decoder: the fixed PCA picture

    images = tensorboard_images(run)
    assert set(images) == {("samples", 2), ("samples", 4)}
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(images[("samples", 4)]))), last)


def test_last_grid_is_what_the_saved_weights_sample(run, finished, tmp_path):
    """The step-4 grid is exactly what the saved (final) weights sample with the stage's PCA: the change
    between grids comes from the weights, not from new noise."""
    cfg, mesh, pipe = finished
    (tmp_path / "samples").mkdir()
    shutil.copy(run / "samples" / samples.PCA_FILE, tmp_path / "samples" / samples.PCA_FILE)
    path = samples.TrainingSamples(cfg, str(tmp_path), pipe.tokenizer, mesh).write(4, pipe.model)
    np.testing.assert_array_equal(png(path), png(run / "samples" / "4.png"))


def test_grid_through_a_pixel_decoder(finished, tmp_path):
    _, mesh, pipe = finished
    cfg = demo_config(**{**OVERRIDES, "train.sample_prompts": PROMPTS[:2], "train.sample_decoder_steps": 4})
    # An untrained demo-sized pixel decoder (32 x 32 RGB through 2 x 2 space-to-depth), in its Orbax form.
    unet = UNet2DConditionModel(configlib.component(cfg, "decoder"), rngs=nnx.Rngs(0))
    dec_dir = tmp_path / "ckpt" / checkpoints.DECODER_DIR
    checkpoints.save_decoder(Decoder(unet, None, scheduler.SchedulerConfig(prediction_type="v_prediction"),
                                     pixel_patch=cfg.demo.decoder_pixel_patch), str(dec_dir))
    # Inside a checkpoint folder: its pipeline.json's negative (the demo's decoder: the zero image).
    checkpoints.write_pipeline_defaults(str(tmp_path / "ckpt"), negative="zero_image")
    cfg.train.sample_decoder = str(dec_dir)
    configlib.validate(cfg)
    sampler = samples.TrainingSamples(cfg, str(tmp_path / "run"), pipe.tokenizer, mesh)
    assert sampler.decoder is not None and sampler.negative == "zero_image"
    grid = png(sampler.write(2, pipe.model))
    assert grid.shape == (samples.TILE, 2 * samples.TILE + samples.GAP, 3)
    assert not (tmp_path / "run" / "samples" / samples.PCA_FILE).exists()  # decoded pixels, not the PCA picture
    assert grid.std() > 10


def test_bad_sample_keys_name_the_key(data, tmp_path):
    for key, value in (("train.sample_every", -1), ("train.sample_prompts", ()), ("train.sample_prompts", ("ok", " ")),
                       ("train.sample_decoder_steps", 0)):
        cfg = demo_config(**{**OVERRIDES, key: value})
        with pytest.raises(configlib.ConfigError, match=key.replace(".", r"\.")):
            configlib.validate(cfg)
    cfg = demo_config(**{**OVERRIDES, "train.stage": "understanding"})
    with pytest.raises(configlib.ConfigError, match=r"train\.sample_every"):
        configlib.validate(cfg)
    cfg = demo_config(**{**OVERRIDES, **data, "train.sample_decoder": str(tmp_path)})
    with pytest.raises(configlib.ConfigError, match=r"train\.sample_decoder"):
        samples.TrainingSamples(cfg, str(tmp_path / "run"), None, sharding.make_mesh(cfg.mesh))
