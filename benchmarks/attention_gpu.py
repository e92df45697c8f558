"""Attention backends (models/attention.py) timed and checked on the shapes the models run (issue 23).

    python benchmarks/attention_gpu.py                    # on a machine with an NVIDIA GPU (or a TPU)
    python benchmarks/attention_gpu.py --cases llm_causal_4096,unet_self --runs 20
    python benchmarks/attention_gpu.py --splash-interpret  # CPU: adds splash in Pallas interpret mode, tiny

For every case and every backend the platform runs (GPU: xla, cudnn; TPU: xla, splash; CPU: xla, and
splash in interpret mode with ``--splash-interpret``) it times the forward and the forward+backward
(gradients of q, k, v) in bfloat16 under jit, medians of ``--runs`` calls after two warm-up calls
(compilation excluded), reports XLA's temporary memory of the compiled forward+backward, what
``auto`` would pick, and checks the result, then prints a markdown table headed by the device.

The check (``within_tolerance``). The reference is the xla path in float32 on the same
bfloat16-rounded inputs. A bfloat16 backend's forward and gradients must be within
``TOL_FACTOR`` x the error of the xla path itself in bfloat16, plus ``TOL_FLOOR``, all relative to
max|reference|. Why not a fixed tolerance against xla-bfloat16: both round the probabilities to
bfloat16 before the value product, but at different points (a flash kernel rounds unnormalised
block probabilities and rescales online, xla rounds the normalised ones), so they differ by a few
bfloat16 steps (2**-8 relative) that vary with the shape; measuring xla's own bfloat16 error on the
same data makes the bound scale with them, while a wrong mask or layout is off by O(1).

A call a kernel cannot take (cuDNN with left-padding segment ids or the ViT's window ids) runs
xla: its row says "falls back to xla" and is not timed twice.

On CPU (no GPU here) cuDNN cannot even be lowered ("cuDNN is not detected"): the script says so,
runs xla on shapes scaled down by ``--scale`` (default 16 on CPU) and splash only if asked; CPU
timings are not a statement about accelerators, and interpret-mode splash is not a speed measurement.
Memory: xla materialises float32 (B, heads, Lq, Lk) scores, about 4 GB for llm_causal_4096's forward
and a few times that with the backward and the float32 reference; on a small GPU pass ``--scale 2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from blip3o_jax import flops  # noqa: E402
from blip3o_jax.models import attention  # noqa: E402

TOL_FACTOR = 2.0
TOL_FLOOR = 2.0**-8  # one bfloat16 step at max|reference|: guards against a lucky near-zero xla error


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    batch: int
    lq: int
    lk: int
    hq: int
    hkv: int
    d: int
    causal: bool = False
    left_pad: tuple[int, ...] = ()  # per row: left-padding tokens (traced kv segment ids, as the LLM's prompts)
    window: int = 0  # tokens per window: static host segment ids (the Qwen ViT's window layers)

    def scaled(self, factor: int) -> "Case":
        """Lengths (and padding) divided by ``factor``; batch, heads and head width kept (every padded row
        stays, and the head layout is what decides the kernels)."""
        if factor == 1:
            return self
        lq, lk = max(8, self.lq // factor), max(8, self.lk // factor)
        return dataclasses.replace(self, lq=lq, lk=lk, left_pad=tuple(p // factor for p in self.left_pad),
                                   window=min(self.window, lq))

    def mask(self) -> str:
        parts = ["causal"] * self.causal + ["left padding"] * bool(self.left_pad)
        parts += [f"windows of {self.window} (static)"] * bool(self.window)
        return ", ".join(parts) or "none"

    def kwargs(self) -> dict:
        """The masking arguments of dot_product_attention."""
        kw: dict = dict(causal=self.causal)
        if self.left_pad:
            pads = np.asarray(self.left_pad)[:, None]
            kw["kv_segment_ids"] = jnp.asarray(np.where(np.arange(self.lk)[None] >= pads, 0, -1).astype(np.int32))
        if self.window:
            ids = (np.arange(self.lq) // self.window).astype(np.int32)
            kw.update(q_segment_ids=ids, kv_segment_ids=ids)
        return kw


# Full-size shapes of the released models (BLIP3-o 8B: Qwen2.5-VL-7B, its ViT, the DiT head, the SDXL decoder).
CASES = {c.label: c for c in [
    Case("llm_causal_2048", 4, 2048, 2048, 28, 4, 128, causal=True),
    Case("llm_left_padded_2048", 4, 2048, 2048, 28, 4, 128, causal=True, left_pad=(0, 17, 300, 1111)),
    Case("llm_causal_4096", 2, 4096, 4096, 28, 4, 128, causal=True),
    Case("llm_left_padded_4096", 2, 4096, 4096, 28, 4, 128, causal=True, left_pad=(0, 1500)),
    # An 896x896 image: 64x64 patches; window layers see 8x8-patch windows (112 px), 4 of 32 layers all.
    Case("vit_windows", 1, 4096, 4096, 16, 16, 80, window=64),
    Case("vit_full", 1, 4096, 4096, 16, 16, 80),
    # The DiT head: 64 target tokens; self- and cross-attention (to the 64 query states) have one shape.
    Case("dit", 32, 64, 64, 28, 28, 64),
    # SDXL UNet at 1024 px: 64x64 latents at the 640-channel level (10 heads x 64); cross to 64 EVA tokens.
    Case("unet_self", 2, 4096, 4096, 10, 10, 64),
    Case("unet_cross", 2, 4096, 64, 10, 10, 64),
]}


def inputs(case: Case, seed: int = 0):
    """q, k, v and an output cotangent, standard normal, rounded to bfloat16."""
    rng = np.random.default_rng(seed)
    shapes = [(case.batch, case.lq, case.hq, case.d), *[(case.batch, case.lk, case.hkv, case.d)] * 2,
              (case.batch, case.lq, case.hq, case.d)]
    return tuple(jnp.asarray(rng.standard_normal(s, np.float32), jnp.bfloat16) for s in shapes)


def runs_as(case: Case, implementation: str, on: str | None = None) -> str:
    """The backend dot_product_attention picks for this case (left padding: traced ids; windows: host ids)."""
    return attention.select_backend(
        implementation, q_shape=(case.batch, case.lq, case.hq, case.d),
        kv_shape=(case.batch, case.lk, case.hkv, case.d), dtype=jnp.bfloat16, causal=case.causal,
        segment_ids=bool(case.left_pad), static_segments=bool(case.window), on=on)


def functions(case: Case, implementation: str):
    """(forward, forward+backward) jitted: the attention output, and the (dq, dk, dv) of <out, w>."""
    attend = functools.partial(attention.dot_product_attention, implementation=implementation, **case.kwargs())

    def forward_backward(q, k, v, w):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(w.astype(out.dtype))

    return jax.jit(attend), jax.jit(forward_backward)


def relative_error(got, want) -> float:
    """max over the output and the gradients of max|got - want| / max|want|."""
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
               for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def within_tolerance(error: float, xla_error: float) -> bool:
    return error <= TOL_FACTOR * xla_error + TOL_FLOOR


@functools.lru_cache(maxsize=1)  # the backends of one case share it
def reference(case: Case):
    """(the float32 xla output and gradients, the relative error of xla in bfloat16 from them)."""
    q, k, v, w = inputs(case)
    _, xla = functions(case, "xla")
    want = xla(*(x.astype(jnp.float32) for x in (q, k, v, w)))
    return want, relative_error(xla(q, k, v, w), want)


def check(case: Case, implementation: str) -> dict:
    """The backend's bfloat16 forward + gradients against the float32 xla reference (module docstring)."""
    want, xla_error = reference(case)
    error = relative_error(functions(case, implementation)[1](*inputs(case)), want)
    return dict(runs_as=runs_as(case, implementation), error=error, xla_error=xla_error,
                ok=within_tolerance(error, xla_error))


def timed(fn, args, runs: int) -> float:
    """Median seconds of ``runs`` calls after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(case: Case, implementation: str, runs: int) -> dict:
    q, k, v, w = inputs(case)
    forward, forward_backward = functions(case, implementation)
    compiled = forward_backward.lower(q, k, v, w).compile()
    memory = compiled.memory_analysis()
    width, result = case.hq * case.d, check(case, implementation)
    result.update(
        forward=timed(forward, (q, k, v), runs),
        forward_backward=timed(compiled, (q, k, v, w), runs),
        temp_mib=getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else float("nan"),
        # Dense count (a causal mask is not halved), as flops.attention_flops and the planner count it.
        flops=flops.attention_flops(1, case.lq, width, case.batch, "forward", kv_seq=case.lk),
    )
    return result


def backends_for(platform: str, splash_interpret: bool) -> list[str]:
    return {"gpu": ["xla", "cudnn"], "tpu": ["xla", "splash"]}.get(platform, ["xla"] + ["splash"] * splash_interpret)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--cases", default="", help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--runs", type=int, default=0, help="timed calls per measurement (default: 10, CPU 3)")
    parser.add_argument("--scale", type=int, default=0, help="divide the lengths by this (default: 1, CPU 16)")
    parser.add_argument("--splash-interpret", action="store_true",
                        help="CPU only: add splash in Pallas interpret mode (slow; forces --scale >= 16)")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    platform = device.platform
    on_cpu = platform == "cpu"
    scale = args.scale or (16 if on_cpu else 1)
    if on_cpu and args.splash_interpret:
        scale = max(scale, 16)
    runs = args.runs or (3 if on_cpu else 10)
    backends = backends_for(platform, args.splash_interpret)
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; allowed: {list(CASES)}")

    print(f"# Attention backends on {device.device_kind} ({platform}, {jax.device_count()} device(s)), "
          f"jax {jax.__version__}, {datetime.date.today()}")
    if on_cpu:
        interpret = " (and splash in Pallas interpret mode, which is not a speed measurement)"
        print("\ncuDNN needs an NVIDIA GPU: jax.default_backend() is cpu, so only xla runs here"
              + interpret * args.splash_interpret
              + f". Shapes scaled down by {scale}; CPU timings say nothing about accelerators.")
    print(f"\nbfloat16, median of {runs} calls after 2 warm-up calls; lengths divided by {scale}. "
          f"Check: forward and (dq, dk, dv) within {TOL_FACTOR:g} x xla-bfloat16's error + 2^-8 of the float32 xla "
          "reference (relative to max|reference|). TFLOP/s: dense count of the forward (causal not halved).\n")
    print("| case | B, Lq, Lk, Hq/Hkv x D | mask | backend | runs as | auto picks | forward ms | fwd+bwd ms "
          "| forward TFLOP/s | fwd+bwd temp MiB | error | xla-bf16 error | ok |")
    print("|---|---|---|---|---|---|--:|--:|--:|--:|--:|--:|---|")
    failed = False
    for name in names:
        case = CASES[name].scaled(scale)
        shape = f"{case.batch}, {case.lq}, {case.lk}, {case.hq}/{case.hkv} x {case.d}"
        auto = runs_as(case, "auto", on=platform)
        for backend in backends:
            actual = runs_as(case, backend, on=platform)
            if actual != backend:
                print(f"| {name} | {shape} | {case.mask()} | {backend} | falls back to {actual} | {auto} "
                      "| | | | | | | |", flush=True)
                continue
            r = measure(case, backend, runs)
            failed |= not r["ok"]
            print(f"| {name} | {shape} | {case.mask()} | {backend} | {actual} | {auto} | {r['forward'] * 1e3:.2f} "
                  f"| {r['forward_backward'] * 1e3:.2f} | {r['flops'] / r['forward'] / 1e12:.3g} | {r['temp_mib']:.1f} "
                  f"| {r['error']:.1e} | {r['xla_error']:.1e} | {'yes' if r['ok'] else 'NO'} |", flush=True)
    if failed:
        sys.exit("a backend is outside the tolerance of the xla reference (the 'ok' column)")


if __name__ == "__main__":
    main()
