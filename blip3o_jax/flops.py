"""Analytic FLOPs per training step and model FLOPs utilisation (MFU), as MaxText/Levanter count them:
2 FLOPs per parameter per token for a forward matmul, x3 when weight gradients are needed, x2 when
only activation gradients flow through (a frozen backbone feeding trainable queries), plus attention
score/value matmuls. Embedding lookups are free."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device (vendor figures); the CPU figure is what this repo measured
# for float32 matmuls on its 2-core CI machines (environment.md), so CPU MFU is indicative only.
DEVICE_PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
    "cpu": 2e11,
}


def device_peak_flops(device: jax.Device | None = None) -> float:
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name in sorted(DEVICE_PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name) or name in kind:
            return DEVICE_PEAK_FLOPS[name]
    return DEVICE_PEAK_FLOPS["cpu"] if jax.default_backend() == "cpu" else float("nan")


def dense_flops(params: int, tokens: int, mode: str) -> float:
    """mode: 'forward' (frozen, no grads), 'backprop' (activation grads only), 'train' (weight grads)."""
    factor = {"forward": 2, "backprop": 4, "train": 6}[mode]
    return float(factor) * params * tokens


def attention_flops(layers: int, seq: int, width: int, batch: int, mode: str, kv_seq: int | None = None) -> float:
    """QK^T and AV matmuls: 2 * 2 * seq * kv_seq * width per layer and sample (forward)."""
    factor = {"forward": 1, "backprop": 2, "train": 3}[mode]
    return factor * 4.0 * layers * seq * (kv_seq or seq) * width * batch


def mfu(flops_per_step: float, step_seconds: float, num_devices: int | None = None) -> float:
    num_devices = num_devices or jax.device_count()
    return flops_per_step / max(step_seconds, 1e-9) / (device_peak_flops() * num_devices)
