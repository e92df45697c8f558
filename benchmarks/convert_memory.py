"""Peak host memory of the streaming PyTorch -> Orbax conversion (issue 6 acceptance: peak resident
memory < 1.5 x the largest tensor + 1 GB for a checkpoint of at least 4 GB; issue 20: stacked arrays
written slice by slice, so the peak follows the largest single tensor, not the largest stack).

    python benchmarks/convert_memory.py                 # ~4.3 GB synthetic checkpoint (preset 'mid')
    python benchmarks/convert_memory.py --preset dit    # ~5.5 GiB: the released-size DiT (24 blocks)
    python benchmarks/convert_memory.py --preset small  # ~0.2 GB, a few seconds (used by the tests)
    python benchmarks/convert_memory.py --preset stack8b [--baseline]
        # one 8B-sized LLM MLP stack, 28 x (18944 x 3584) float32 = 7.6 GB, alone (conversion.write_param_tree);
        # --baseline: the former strategy (the stack assembled on the host, then one Orbax save)

Writes a synthetic checkpoint in the released BLIP3-o key names at a mid size (the released vocabulary
151668, an untied 2048-wide LLM with 2 layers, a released-width DiT with 4 blocks, a 2-block EVA of the
released width), random float32 data generated tensor by tensor and written shard by shard (never the
whole checkpoint in memory). Then runs ``blip3o_jax.convert.torch_to_orbax`` in a fresh subprocess and
reads that process's peak resident set (VmHWM from /proc/self/status).
Prints one JSON line with the checkpoint size, the largest tensor, the peak, the RSS after imports and
the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

PRESETS = {
    # LLM width/heads/kv/ffn, DiT width/heads/blocks, EVA width/head width/image/patch/pool
    "mid": dict(hidden=2048, heads=16, kv=2, ffn=5504, dit_dim=1792, dit_heads=28, dit_layers=4,
                eva_width=1792, eva_head=112, image=448, patch=14, pool=4),
    # The released DiT head (24 blocks of width 1792, FFN 4864: its (24, 4864, 1792) stacks are 0.84 GB) beside
    # a narrow LLM (the released vocabulary) and a 1-block EVA of the released width.
    "dit": dict(hidden=256, heads=4, kv=2, ffn=512, dit_dim=1792, dit_heads=28, dit_layers=24,
                eva_width=1792, eva_head=112, image=448, patch=14, pool=4, eva_layers=1),
    "small": dict(hidden=256, heads=4, kv=2, ffn=512, dit_dim=256, dit_heads=4, dit_layers=2,
                  eva_width=256, eva_head=64, image=112, patch=14, pool=1),
}


def synthetic_config(preset: str):
    from blip3o_jax import configlib

    p = PRESETS[preset]
    cfg = configlib.base_config()
    m = cfg.model
    m.llm.update(dict(hidden_size=p["hidden"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                      intermediate_size=p["ffn"], num_hidden_layers=2, tie_word_embeddings=False,
                      mrope_section=(16, 24, 24) if p["hidden"] // p["heads"] == 128 else (8, 12, 12)))
    m.vision.update(dict(depth=1, hidden_size=64, num_heads=2, intermediate_size=128, fullatt_block_indexes=(0,),
                         out_hidden_size=p["hidden"]))
    m.dit.update(dict(dim=p["dit_dim"], n_heads=p["dit_heads"], n_kv_heads=p["dit_heads"], n_layers=p["dit_layers"],
                      in_channels=p["eva_width"], input_size=p["image"] // p["patch"] // p["pool"],
                      latent_embedding_size=p["hidden"]))
    m.eva.update(dict(width=p["eva_width"], head_width=p["eva_head"], layers=p.get("eva_layers", 2),
                      image_size=p["image"],
                      patch_size=p["patch"], pooling=f"early_pool2d_{p['pool']}"))
    m.dtype = m.param_dtype = "float32"
    return configlib.validate(cfg)


def write_checkpoint(path: str, preset: str) -> dict:
    """Random released-layout checkpoint, one tensor generated at a time; returns size statistics."""
    import numpy as np
    from flax import nnx

    from blip3o_jax import conversion, weights
    from blip3o_jax.models import blip3o as model_lib

    cfg = synthetic_config(preset)
    mcfg = model_lib.Blip3oConfig.from_config(cfg)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: model_lib.Blip3o(mcfg, rngs=nnx.Rngs(0)))
    expected = weights.expected_torch_keys(conversion.model_rules(mcfg), nnx.state(abstract, nnx.Param))
    shapes = {k: e[3] for k, e in expected.items()}
    rng = np.random.default_rng(0)

    def tensors():
        for key, shape in shapes.items():
            yield key, (0.02 * rng.standard_normal(shape, dtype=np.float32))

    weights.save_safetensors_sharded(tensors(), path, max_shard_bytes=1 << 30)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conversion.hf_config(cfg), f, indent=1)
    sizes = [int(np.prod(s)) * 4 for s in shapes.values()]
    return dict(checkpoint_bytes=sum(sizes), largest_tensor_bytes=max(sizes), tensors=len(sizes))


# One LLM MLP stack of the 8B model (Qwen2.5-7B: 28 layers, intermediate 18944, hidden 3584).
STACK8B = dict(layers=28, rows=18944, cols=3584)
STACK_KEY = "model.layers.{i}.mlp.up_proj.weight"
STACK_PATH = ("backbone", "model", "layers", "mlp", "up_proj", "kernel")


def write_stack(path: str) -> dict:
    """The 28 (18944, 3584) float32 tensors of one stack, one generated at a time, one shard each."""
    import numpy as np

    from blip3o_jax import weights

    p, rng = STACK8B, np.random.default_rng(0)
    tensors = ((STACK_KEY.format(i=i), 0.02 * rng.standard_normal((p["rows"], p["cols"]), dtype=np.float32))
               for i in range(p["layers"]))
    weights.save_safetensors_sharded(tensors, path, max_shard_bytes=1 << 28)
    one = p["rows"] * p["cols"] * 4
    return dict(checkpoint_bytes=p["layers"] * one, largest_tensor_bytes=one, tensors=p["layers"])


def child_stack(src: str, dst: str, baseline: bool) -> None:
    """The stack converted alone: (layers, 3584, 18944) kernel, as torch_to_orbax writes a stacked array."""
    import numpy as np
    from orbax.checkpoint.experimental import v1 as ocp_v1

    from blip3o_jax import conversion, weights

    p = STACK8B
    view = weights.TorchCheckpoint(src)
    shape = (p["layers"], p["cols"], p["rows"])
    leaf = (STACK_PATH, shape, np.dtype(np.float32))
    entries = {"/".join(STACK_PATH): [(STACK_KEY.format(i=i), i, "linear") for i in range(p["layers"])]}
    after_imports = _peak_rss_bytes()
    t0 = time.time()
    if baseline:  # the former torch_to_orbax: the whole stack filled on the host, then one partial save
        out = np.empty(shape, np.float32)
        for key, i, transform in entries["/".join(STACK_PATH)]:
            out[i] = weights.to_jax_layout(view.get(key), transform)
        tree: dict = {}
        node = tree
        for k in STACK_PATH[:-1]:
            node = node.setdefault(k, {})
        node[STACK_PATH[-1]] = out
        ctx = ocp_v1.Context()
        ctx.memory.deepcopy_host_arrays = False
        with ctx:
            ocp_v1.partial.save(dst + ".partial", tree)
        ocp_v1.partial.finalize(dst + ".partial")
    else:
        conversion.write_param_tree(view, [[leaf]], [leaf], entries, os.path.abspath(dst))
    print(json.dumps(dict(peak_rss_bytes=_peak_rss_bytes(), rss_after_imports_bytes=after_imports,
                          convert_seconds=round(time.time() - t0, 2))))


def _peak_rss_bytes() -> int:
    """VmHWM of this process image. (ru_maxrss is not used: after fork + exec Linux carries the
    parent's pre-exec peak into it, here the checkpoint writer's.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(src: str, dst: str) -> None:
    """Runs in the measured subprocess: imports, then the conversion alone."""
    from blip3o_jax import convert

    after_imports = _peak_rss_bytes()
    t0 = time.time()
    convert.torch_to_orbax(src, dst, progress=False)
    print(json.dumps(dict(peak_rss_bytes=_peak_rss_bytes(), rss_after_imports_bytes=after_imports,
                          convert_seconds=round(time.time() - t0, 2))))


def measure(preset: str, workdir: str | None = None, keep: bool = False, baseline: bool = False) -> dict:
    root = workdir or tempfile.mkdtemp(prefix="convert_memory_")
    src, dst = os.path.join(root, "torch"), os.path.join(root, "orbax")
    try:
        stats = write_stack(src) if preset == "stack8b" else write_checkpoint(src, preset)
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)  # one host device, as the CLI uses
        flag = "--child-stack" if preset == "stack8b" else "--child"
        extra = ["--baseline"] if baseline else []
        out = subprocess.run([sys.executable, os.path.abspath(__file__), flag, src, dst, *extra], env=env,
                             check=True, capture_output=True, text=True)
        stats.update(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    stats["bound_bytes"] = int(1.5 * stats["largest_tensor_bytes"] + (1 << 30))
    stats["peak_over_largest"] = round(stats["peak_rss_bytes"] / stats["largest_tensor_bytes"], 2)
    stats["within_bound"] = stats["peak_rss_bytes"] < stats["bound_bytes"]
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS) + ["stack8b"], default="mid")
    parser.add_argument("--baseline", action="store_true", help="stack8b: the former host-assembled stack")
    parser.add_argument("--child-stack", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.child_stack:
        child_stack(*args.child_stack, args.baseline)
        return
    s = measure(args.preset, args.workdir, args.keep, args.baseline)
    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    print(f"checkpoint {gb(s['checkpoint_bytes'])} in {s['tensors']} tensors, largest tensor "
          f"{gb(s['largest_tensor_bytes'])}; conversion peak RSS {gb(s['peak_rss_bytes'])} "
          f"({s['peak_over_largest']}x largest; after imports {gb(s['rss_after_imports_bytes'])}); "
          f"bound 1.5x largest + 1 GB = {gb(s['bound_bytes'])}: {'OK' if s['within_bound'] else 'EXCEEDED'}; "
          f"{s['convert_seconds']} s")
    print(json.dumps(s))


if __name__ == "__main__":
    main()
