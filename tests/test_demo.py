"""The embedded demo end to end: ``configs/demo.py:smoke`` runs every stage through the trainer CLI
(data shards, target encoder, understanding, generation, pixel decoder, report) and writes the
contract's report.json and sample grid; the workdir is then an ordinary model checkpoint that the
generate CLI reads. The full demo's
accuracy targets are measured by ``make demo`` (README), not here: smoke steps are far too few."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip3o_jax import checkpoints
from blip3o_jax.decoder import scheduler

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_space_to_depth_packs_blocks_row_major_and_inverts():
    x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    packed = np.asarray(scheduler.space_to_depth(x, 2))
    assert packed.shape == (2, 2, 3, 12)
    # Position (i, j) holds the 2x2 block x[2i:2i+2, 2j:2j+2] in row-major order, RGB innermost.
    np.testing.assert_array_equal(packed[1, 1, 2], x[1, 2:4, 4:6].reshape(12))
    np.testing.assert_array_equal(np.asarray(scheduler.depth_to_space(packed, 2)), x)
    assert scheduler.space_to_depth(x, 1) is x


@pytest.mark.slow
def test_smoke_demo_writes_report_and_samples(tmp_path):
    workdir = tmp_path / "smoke"
    # One CPU device, as `make demo` runs it (the suite's 8 fake devices would shard every stage 8 ways).
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "blip3o_jax.train", "--config", "configs/demo.py:smoke",
                          "--workdir", str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = json.loads((workdir / "report.json").read_text())
    assert set(report) == {"generation", "understanding", "wall_seconds", "samples"}
    gen, und = report["generation"], report["understanding"]
    assert set(gen) == {"color_accuracy", "shape_accuracy", "position_accuracy", "n"} and gen["n"] == 4
    assert all(0.0 <= gen[k] <= 1.0 for k in ("color_accuracy", "shape_accuracy", "position_accuracy"))
    assert set(und) == {"accuracy", "n"} and und["n"] == 4 and 0.0 <= und["accuracy"] <= 1.0
    assert report["wall_seconds"] > 0
    for stage in ("target", "understanding", "generation"):
        assert checkpoints.is_model_checkpoint(workdir / stage / "params"), stage
    assert checkpoints.is_decoder_dir(str(workdir / "decoder"))
    # WORKDIR itself is an ordinary model checkpoint (checkpoints.py), nothing demo-specific to read it.
    assert checkpoints.model_dir(workdir) == str(workdir) and checkpoints.is_model_checkpoint(workdir)
    assert checkpoints.has_tokenizer(str(workdir))
    assert checkpoints.is_decoder_dir(str(workdir / checkpoints.DECODER_DIR))
    assert checkpoints.pipeline_defaults(str(workdir))["negative"] == "zero_image"
    assert json.loads((workdir / "config.json").read_text()) == json.loads(
        (workdir / "generation" / "params" / "config.json").read_text())
    grid = np.asarray(Image.open(workdir / report["samples"]))
    side = 16 * 2  # decoder.sample_size x demo.decoder_pixel_patch
    assert grid.shape == (side, 4 * side, 3)  # 4 samples in one row of the grid
    assert grid.std() > 0  # real pictures, not a constant canvas

    # The generate CLI reads the demo workdir (pixel-space decoder with its 2x2 pixel patch).
    out = tmp_path / "fox.png"
    gen_run = subprocess.run([sys.executable, "-m", "blip3o_jax.generate", "--checkpoint", str(workdir), "--prompt",
                              "a red circle on the left", "--out", str(out), "--steps", "2", "--decoder-steps", "2"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert gen_run.returncode == 0, gen_run.stderr[-3000:]
    assert np.asarray(Image.open(out)).shape == (side, side, 3)

    # A training stage that stops before its end (as after SIGTERM) ends the demo cleanly: no report,
    # and the background decoder thread is stopped before its first step (nothing saved), not left running.
    import shutil

    for stage in ("understanding", "generation", "decoder"):
        shutil.rmtree(workdir / stage)
    (workdir / "report.json").unlink()
    driver = ("import sys, threading\n"
              "from blip3o_jax.demo import stages as demo\n"
              "from configs import demo as demo_config\n"
              "report = demo.run(demo_config.get_config('smoke'), sys.argv[1], train_stage=lambda *a, **k: None)\n"
              "alive = [t.name for t in threading.enumerate() if t.name.startswith('decoder')]\n"
              "print('REPORT', report, 'ALIVE', alive)\n")
    stopped = subprocess.run([sys.executable, "-c", driver, str(workdir)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "REPORT None ALIVE []" in stopped.stdout, stopped.stdout[-2000:]
    assert not (workdir / "report.json").exists()
    assert not (workdir / "decoder" / "params").exists()
