"""PyTorch references and tiny-checkpoint builders shared by several test files (and the benchmarks).

One module per component: dit (diffusers' Lumina DiT + caption MLP), eva (timm's EVA), qwen
(transformers' Qwen2.5-VL), decoder (diffusers' UNet / VAE / Euler scheduler), flow (diffusers'
flow-matching scheduler and the guided loop), blip3o (the tiny released-layout checkpoint), configs
(the repository's config files). Test files import from here and never from one another
(tests/test_layout.py checks): importing a test module runs its module-level setup, and a fixture
imported into a second module is a second fixture, built again under the other name.
"""

from tests import torch_shim  # noqa: F401  (must precede every transformers / diffusers / timm import)
