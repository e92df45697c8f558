"""Full-size TPU plans checked by XLA's TPU compiler without chips (issues 21 and 23): the trainer's own
step (plan.compile_train_step) AOT-compiled on libtpu topology descriptions, beside the planner.

    nice -n 15 .venv/bin/python benchmarks/tpu_plans.py --run all --out runs/tpu_plans.json   (one case per process)
    .venv/bin/python benchmarks/tpu_plans.py --table --out runs/tpu_plans.json                (markdown tables)

Each compile takes minutes on 2 cores (scanned layers: compile time hardly depends on depth) and
several GiB of host memory, so every case runs in a process of its own, one after another, and its
XLA figures are appended to ``--out``; ``--table`` recomputes the planner (cheap) beside them. XLA's
compiled FLOPs are recorded but not tabulated: cost_analysis counts a scanned layer stack's body once
and includes remat's recomputation (tests/test_plan_tpu.py compares them on an unrolled reduced model).
"idle" parameters are frozen ones the stage never reads (plan.IDLE_PARAMS): jit prunes them from the
step, the trainer still holds them, so fitting counts them beside XLA's peak.

Cases (global batch 32 for understanding, the configs' own batch for generation):
  gen8b_v5p64       8B generation on v5p-64, data=16,fsdp=2 (frozen towers in bfloat16, the default)
  gen8b_v5p64_f32   the same with model.frozen_param_dtype=float32 (the bfloat16 saving)
  gen4b_v5e256      4B generation on v5e-256, the planner's mesh
  und8b_v5p64       8B understanding (Qwen2.5-VL-7B trained, ViT included), 2048 tokens, v5p-64
  und8b_v4_32       the same on v4-32
  und8b_4k_splash   8B understanding at 4096 tokens on v5p-64, model.attention=splash
  und8b_4k_xla      the same with model.attention=xla
  vit1792_splash    8B understanding with one 1792x1792 image per sequence (16384 ViT patches, 4096 image
                    tokens, 4608-token sequences), v5p-64 data=16,fsdp=2, model.attention=splash
  vit1792_xla       the same with model.attention=xla (the same mesh, so the two compare)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The compile targets a described TPU; the host backend stays the CPU (no TPU chips are opened).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The Qwen ViT at 1792x1792: 128x128 patches (16384, its full-attention layers attend over all of them),
# 4096 merged image tokens, 512 text tokens beside them.
VIT1792 = {"data.und_image_size": 1792, "data.max_length": 4608}
UND = {"train.stage": "understanding", "data.global_batch_size": 32, "data.max_length": 2048}
CASES = {
    "gen8b_v5p64": dict(config="blip3o_8b", stage="generation", slice="v5p-64", mesh="data=16,fsdp=2,tensor=1"),
    "gen8b_v5p64_f32": dict(config="blip3o_8b", stage="generation", slice="v5p-64", mesh="data=16,fsdp=2,tensor=1",
                            overrides={"model.frozen_param_dtype": "float32"}),
    "gen4b_v5e256": dict(config="blip3o_4b", stage="generation", slice="v5e-256", mesh="auto"),
    "und8b_v5p64": dict(config="blip3o_8b", stage="understanding", slice="v5p-64", mesh="auto", overrides=UND),
    "und8b_v4_32": dict(config="blip3o_8b", stage="understanding", slice="v4-32", mesh="auto", overrides=UND),
    "und8b_4k_splash": dict(config="blip3o_8b", stage="understanding", slice="v5p-64", mesh="auto",
                            overrides={**UND, "data.max_length": 4096, "model.attention": "splash"}),
    "und8b_4k_xla": dict(config="blip3o_8b", stage="understanding", slice="v5p-64", mesh="auto",
                         overrides={**UND, "data.max_length": 4096, "model.attention": "xla"}),
    "vit1792_splash": dict(config="blip3o_8b", stage="understanding", slice="v5p-64", mesh="data=16,fsdp=2,tensor=1",
                           overrides={**UND, **VIT1792, "model.attention": "splash"}),
    "vit1792_xla": dict(config="blip3o_8b", stage="understanding", slice="v5p-64", mesh="data=16,fsdp=2,tensor=1",
                        overrides={**UND, **VIT1792, "model.attention": "xla"}),
}


def load_config(case: dict):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(case["config"], os.path.join(root, "configs", case["config"] + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(None)
    for key, value in case.get("overrides", {}).items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def planner(case: dict):
    """(the planner's Plan, the mesh dict) for a case: its mesh, or the one plan.recommend picks."""
    from blip3o_jax import plan

    cfg = load_config(case)
    stage = case["stage"]
    _, _, _, count = plan.device_spec(case["slice"])
    if case["mesh"] == "auto":
        p = plan.recommend(cfg, count, case["slice"], stage=stage)
        if p is None:
            raise SystemExit(f"nothing fits on {case['slice']}")
        cfg.train.grad_accum = p.grad_accum
        return cfg, p
    return cfg, plan.make_plan(cfg, plan.parse_mesh(case["mesh"]), case["slice"], stage=stage)


def run_case(name: str, out: str) -> None:
    import jax

    from blip3o_jax import plan, sharding

    case = CASES[name]
    cfg, p = planner(case)
    topo, reason = plan.tpu_topology(case["slice"])
    if topo is None:
        raise SystemExit(f"no topology for {case['slice']}: {reason}; {plan.LIBTPU_HINT}")
    mesh = sharding.make_mesh(p.mesh, topo.devices)
    start = time.perf_counter()
    try:
        xla = plan.compile_train_step(cfg, case["stage"], mesh)
    except jax.errors.JaxRuntimeError as e:
        # XLA refuses a program that cannot fit in HBM and says what its temporaries alone would need.
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if need is None:
            raise
        xla = {"refused": str(e).splitlines()[0][:300], "temp_size_in_bytes": float(need.group(1)) * 2**30}
    xla["compile_seconds"] = time.perf_counter() - start
    row = {"case": name, "mesh": p.mesh, "grad_accum": p.grad_accum, "xla": xla}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(out: str) -> str:
    from blip3o_jax import plan

    rows = {}
    with open(out) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[r["case"]] = r  # the newest run of a case
    by_slice: dict[str, list[str]] = {}
    gib = plan.GiB
    for name, r in rows.items():
        case, xla = CASES[name], r["xla"]
        cfg, p = planner({**case, "mesh": ",".join(f"{k}={v}" for k, v in r["mesh"].items())})
        cfg.train.grad_accum = r["grad_accum"]
        p = plan.make_plan(cfg, r["mesh"], case["slice"], stage=case["stage"])
        predicted = p.bytes_total
        hbm = plan.device_spec(case["slice"])[2]
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        if "refused" in xla:  # out of HBM at compile time: only the temporaries' need is known
            by_slice.setdefault(case["slice"], []).append(
                f"| {name} | {mesh} | {r['grad_accum']} | - | needs {xla['temp_size_in_bytes'] / gib:.2f} | "
                f"refused: out of HBM | {predicted / gib:.2f} | - | {p.bytes_idle_params / gib:.2f} | "
                f"NO (planner: {'fits' if p.fits else 'does not fit'}) | {xla['compile_seconds']:.0f} |")
            continue
        peak = xla["peak_bytes"]
        diff = (predicted - peak) / peak
        by_slice.setdefault(case["slice"], []).append(
            f"| {name} | {mesh} | {r['grad_accum']} | {xla['argument_size_in_bytes'] / gib:.2f} | "
            f"{xla['temp_size_in_bytes'] / gib:.2f} | {peak / gib:.2f} | {predicted / gib:.2f} | {diff:+.1%} | "
            f"{p.bytes_idle_params / gib:.2f} | {'yes' if peak + p.bytes_idle_params <= plan.USABLE_FRACTION * hbm else 'NO'} | "
            f"{xla['compile_seconds']:.0f} |")
    head = ("| case | mesh | grad_accum | XLA arguments | XLA temporaries | XLA peak | planner total | planner vs XLA "
            "| idle frozen params | XLA peak + idle fits 90% HBM | compile (s) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    parts = []
    for name, lines in by_slice.items():
        parts.append(f"**{name}** ({plan.device_spec(name)[2] / gib:.0f} GiB HBM per device; GiB per device)\n\n"
                     + head + "\n" + "\n".join(lines))
    return "\n\n".join(parts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="a case, a comma-separated list, or 'all'")
    ap.add_argument("--table", action="store_true", help="print the markdown tables of --out")
    ap.add_argument("--out", default="runs/tpu_plans.json", help="JSON lines of XLA's figures, one per case")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_case(args.run, args.out)
        return
    if args.run:
        names = list(CASES) if args.run == "all" else args.run.split(",")
        print(f"CPU: {cpu_model()}; {os.cpu_count()} cores", flush=True)
        for name in names:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--worker", "--run", name, "--out", args.out])
            print(f"{name}: exit {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
    if args.table:
        print(table(args.out))


if __name__ == "__main__":
    main()
