"""Fair CPU timing harness: each framework in its own process, runs alternated, medians (issue 22).

Why processes: in one process, XLA's worker threads and PyTorch's OpenMP threads compete for the same
cores (PyTorch measured 9x slower after jax had started), so a same-process ratio measures contention.
Here every side ("torch eager", "torch.compile", "jax") is a worker subprocess that imports only its own
framework, builds its case once, runs warm-up calls (compilation included there, reported apart) and
then waits. The parent alternates timed rounds A, B, A, B, ... so a burst of background load hits every
side alike, and reports the median over all timed calls of each side (and the spread of the round
medians). The machine is printed with every table: CPU model, family/model, AVX-512 flags, load
average before and after, thread settings and versions (each worker reports its own).

A case is a factory ``module:function`` taking keyword arguments and returning a zero-argument callable
that runs one timed unit of work and blocks until its result exists. The factory modules import torch /
jax inside the factories, never at module level, so a worker loads only the framework it measures.

    from benchmarks import fair
    fair.compare("DiT train step", [fair.Side("torch eager", "benchmarks.dit_head:torch_train", kw), ...])
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "@@fair "  # prefix of the worker's protocol lines on stdout (libraries may print there too)


@dataclasses.dataclass
class Side:
    label: str
    factory: str  # "module:function"
    kwargs: dict = dataclasses.field(default_factory=dict)
    env: dict = dataclasses.field(default_factory=dict)  # extra environment of this worker


def machine() -> dict:
    """CPU model, family/model, vector flags, cores, load average: printed with every table."""
    info = {"model name": platform.processor() or "?", "cpu family": "?", "model": "?"}
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("model name", "cpu family", "model") and info.get(key) in ("?", platform.processor()):
                    info[key] = value
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    vec = sorted(f for f in flags if f.startswith("avx512")) or ["no avx512"]
    if "avx2" in flags:
        vec.insert(0, "avx2")
    return {"cpu": f"{info['model name']} (family {info['cpu family']} model {info['model']})",
            "vector": " ".join(vec), "cores": os.cpu_count(), "load": os.getloadavg()}


def header(title: str, notes: str = "") -> str:
    m = machine()
    return (f"### {title}\n\nCPU: {m['cpu']}, {m['cores']} cores; flags: {m['vector']}\n"
            f"load average (1/5/15 min) at start: {m['load'][0]:.2f} / {m['load'][1]:.2f} / {m['load'][2]:.2f}"
            + (f"\n{notes}" if notes else ""))


def add_cpus_flag(parser) -> None:
    """``--cpus N``: every worker pinned to N cores (0 = all); read back with ``cpus_env``."""
    parser.add_argument("--cpus", type=int, default=0, help="pin every worker to this many cores (0: all)")


def cpus_env(args) -> dict:
    """The worker environment ``Side.env`` for ``--cpus`` (FAIR_CPUS, applied before a framework starts)."""
    return {"FAIR_CPUS": str(args.cpus)} if args.cpus else {}


# ---------------------------------------------------------------------------------------------
# Worker side


def _settings() -> dict:
    """What this worker runs with: versions and thread settings of the framework it loaded."""
    s = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS") if k in os.environ}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        s.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                 torch_interop_threads=torch.get_num_interop_threads())
    if "jax" in sys.modules:
        jax = sys.modules["jax"]
        try:  # imported (the PyTorch reference modules import blip3o_jax) is not started: check which
            from jax._src import xla_bridge
            started = bool(xla_bridge._backends)
        except (ImportError, AttributeError):
            started = None
        s.update(jax=jax.__version__, xla_backend_started=started)
    s["affinity"] = len(os.sched_getaffinity(0))
    s["loaded"] = [m for m in ("torch", "jax") if m in sys.modules]
    return s


def _send(obj) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(factory: str, kwargs_json: str, warmup: int) -> None:
    cpus = int(os.environ.get("FAIR_CPUS", "0"))
    if cpus:  # before any framework starts: both size their thread pools from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    module, _, name = factory.partition(":")
    t = time.perf_counter()
    fn = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
    setup = time.perf_counter() - t
    first = []
    for _ in range(warmup):  # compilation (jax.jit, torch.compile) and allocator warm-up: not timed
        t = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t)
    _send({"ready": True, "setup_s": setup, "warmup_s": first, "settings": _settings()})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        times, cpu = [], []
        for _ in range(int(cmd[1])):
            t, c = time.perf_counter(), time.process_time()
            fn()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        _send({"times": times, "cpu": cpu})


# ---------------------------------------------------------------------------------------------
# Parent side


class _Proc:
    def __init__(self, side: Side, warmup: int):
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.update(side.env)
        # FAIR_REPO in a side's env: run that side from another checkout (a before/after model-code comparison).
        repo = env.pop("FAIR_REPO", REPO)
        env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
        self.side = side
        self.p = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.fair", side.factory, json.dumps(side.kwargs), str(warmup)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=repo)

    def recv(self) -> dict:
        for line in self.p.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        raise RuntimeError(f"benchmark worker {self.side.label!r} ({self.side.factory}) exited with "
                           f"code {self.p.wait()}; its stderr is above")

    def run(self, n: int) -> tuple[list[float], list[float]]:
        self.p.stdin.write(f"run {n}\n")
        self.p.stdin.flush()
        r = self.recv()
        return r["times"], r["cpu"]

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write("quit\n")
                self.p.stdin.close()
            except BrokenPipeError:
                pass
            self.p.wait()


def compare(case: str, sides: list[Side], *, rounds: int = 5, per_round: int = 1, warmup: int = 2,
            unit: str = "ms", per_item: float | None = None) -> list[dict]:
    """Times every side in its own worker, alternating rounds; prints and returns one result per side.

    Workers are started (set up + warmed up) one after another, in ``sides`` order, so a later side may
    read files an earlier one wrote (the converted weights). Each round runs ``per_round`` calls of
    every side in turn. Ratios are against the first side.
    """
    scale = 1e3 if unit == "ms" else 1.0
    procs, ready = [], []
    try:
        for side in sides:
            procs.append(_Proc(side, warmup))
            ready.append(procs[-1].recv())
        load0 = os.getloadavg()
        times: list[list[float]] = [[] for _ in sides]
        cpu: list[list[float]] = [[] for _ in sides]
        round_medians: list[list[float]] = [[] for _ in sides]
        for _ in range(rounds):
            for i, p in enumerate(procs):
                ts, cs = p.run(per_round)
                times[i] += ts
                cpu[i] += cs
                round_medians[i].append(statistics.median(ts))
        load1 = os.getloadavg()
    finally:
        for p in procs:
            p.close()
    results = []
    base = statistics.median(times[0])
    for side, r, ts, cs, rm in zip(sides, ready, times, cpu, round_medians):
        med = statistics.median(ts)
        results.append(dict(case=case, side=side.label, median_s=med, cpu_s=statistics.median(cs), n=len(ts),
                            round_min_s=min(rm),
                            round_max_s=max(rm), first_s=r["warmup_s"][0] if r["warmup_s"] else None,
                            setup_s=r["setup_s"], settings=r["settings"], speedup_vs_first=base / med,
                            load_during=(load0[0], load1[0])))
    print(f"\n{case}: {rounds} alternating rounds x {per_round} call(s) per side after {warmup} warm-up call(s); "
          f"load average {load0[0]:.2f} -> {load1[0]:.2f}")
    print(f"| side | threads | median {unit} | round medians {unit} | CPU {unit} per call | first call s | "
          f"speed-up vs {sides[0].label} |" + (" items/s |" if per_item else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if per_item else ""))
    for r in results:
        print(f"| {r['side']} | {r['settings']['affinity']} | {r['median_s'] * scale:.1f} | "
              f"{r['round_min_s'] * scale:.1f}-{r['round_max_s'] * scale:.1f} | {r['cpu_s'] * scale:.1f} | "
              f"{r['first_s'] or 0:.1f} | **{r['speedup_vs_first']:.2f}x** |"
              + (f" {per_item / r['median_s']:.2f} |" if per_item else ""))
    for r in results:
        print(f"  {r['side']}: {json.dumps(r['settings'])}")
    print("@@json " + json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
