"""XLA CPU levers for the JAX side, timed against each other (BENCHMARKS.md "CPU levers tried", issue 22).

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_levers.py --case dit_train [--levers default,ynn_off,...]
    PYTHONPATH=. .venv/bin/python benchmarks/cpu_levers.py --case dit_train --levers default --trees ../blip3o_jax_base

Every lever is a worker process of benchmarks.fair with its own ``XLA_FLAGS`` (or CPU affinity), running the
same JAX case as benchmarks/dit_head.py / eva_encoder.py on random weights; rounds alternate, so the ratios
hold under background load. ``--trees DIR,...`` adds each lever once more per checkout DIR (e.g.
``git archive HEAD | tar -x -C DIR``, then a model-code change): before/after on the same harness.

Which flags exist in this jaxlib (0.10.2) and do something, found by compiling a small dot + grad and
reading the optimised HLO: dots go to YNNPACK (``__ynn_fusion``, default type ``individual_dot``);
``--xla_cpu_experimental_ynn_fusion_type=`` (empty) sends them to Eigen instead; the XNN and oneDNN
fusion types and ``--xla_cpu_use_onednn`` change nothing in the HLO of this build.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import fair  # noqa: E402

CASES = {  # name: (factory, kwargs, calls per round, warm-up calls)
    "dit_train": ("benchmarks.dit_head:jax_train", dict(weights_dir=""), 3, 3),
    "dit_sample": ("benchmarks.dit_head:jax_sample", dict(weights_dir=""), 1, 2),
    "eva": ("benchmarks.eva_encoder:jax_forward", dict(weights_dir="", batch=4), 1, 2),
}

YNN = "--xla_cpu_experimental_ynn_fusion_type="
LEVERS = {  # name: extra worker environment
    "default": {},
    "ynn_off": {"XLA_FLAGS": YNN},  # dots on Eigen instead of YNNPACK
    "ynn_dot_eltwise_reduce": {"XLA_FLAGS": YNN + "individual_dot,dot,eltwise,reduce"},
    "eigen_single_thread": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"},
    "one_core": {"FAIR_CPUS": "1"},
    "fusion_emitters_off": {"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false"},
    "no_thunk_runtime": {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"},
    "onednn": {"XLA_FLAGS": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true"},
    "xnn_dot": {"XLA_FLAGS": "--xla_cpu_experimental_xnn_fusion_type=dot"},
    "fast_math": {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"},  # changes float32 results: measured only
}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--case", choices=sorted(CASES), required=True)
    p.add_argument("--levers", default="default,ynn_off,ynn_dot_eltwise_reduce,eigen_single_thread")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--trees", default="", help="also run each lever from these checkouts (comma separated)")
    args = p.parse_args(argv)
    factory, kw, per_round, warmup = CASES[args.case]
    sides = []
    for name in args.levers.split(","):
        sides.append(fair.Side(name, factory, kw, LEVERS[name]))
        for tree in filter(None, args.trees.split(",")):
            label = f"{name} ({os.path.basename(tree.rstrip('/'))})"
            sides.append(fair.Side(label, factory, kw, dict(LEVERS[name], FAIR_REPO=os.path.abspath(tree))))
    print(fair.header(f"CPU levers, {args.case} (benchmarks/cpu_levers.py)"))
    fair.compare(args.case, sides, rounds=args.rounds, per_round=per_round, warmup=warmup)


if __name__ == "__main__":
    main()
