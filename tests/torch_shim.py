"""Lets torchvision (pulled in by timm and by transformers' vision models) import beside CPU torch.

PyPI's torchvision wheel registers fake kernels for ``torchvision::*`` operators that the CPU-only
torch build does not define, and its import fails with ``operator torchvision::nms does not exist``.
Those operators are never used by the parity tests, so registering their fake kernels is skipped.
Test-only: the JAX runtime never imports torch.
"""

try:
    import torch
except ImportError:  # runtime-only environment: nothing to patch
    torch = None

if torch is not None and torch.version.cuda is None:
    _register_fake = torch.library.register_fake

    def _skip_torchvision_ops(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn: fn
        return _register_fake(op, *args, **kwargs)

    torch.library.register_fake = _skip_torchvision_ops
