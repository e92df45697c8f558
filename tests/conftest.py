"""Test setup shared by the whole suite.

Runs before any test module imports jax: 8 fake CPU devices so sharding is really exercised,
absl flags marked parsed (Grain worker processes read them), and the torchvision shim so the
PyTorch references (transformers' Qwen2.5-VL / SigLIP2, timm) import beside the CPU torch build.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compilation dominates the suite; tests (and the training subprocesses they start) share one
# persistent cache, so an identical program is compiled once per machine.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from tests import torch_shim  # noqa: E402,F401  (must precede transformers/timm imports)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (multi-process or end-to-end); deselect with -m 'not slow'")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(PyTorch modules, the tensors, the config.json, the directory) of the tiny released-layout checkpoint
    of tests/references/blip3o.py, shared by test_convert.py and test_inference.py. Module scope, not
    session: test_inference writes a tokenizer and a diffusion-decoder/ into the directory."""
    # Imported here: transformers' Qwen2.5-VL is only loaded by the workers that run these tests.
    from tests.references import blip3o

    return blip3o.released_checkpoint(tmp_path_factory)
