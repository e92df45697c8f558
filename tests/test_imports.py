"""The package's import structure: the layer contracts of pyproject.toml ([tool.importlinter], checked by
import-linter's ``lint-imports``), imports at module top, and what Grain workers and the CLIs load."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blip3o_jax"

# Function-level imports that are deliberate, with the reason. Anything else goes at module top.
LAZY = {
    # Grain workers import data.pipeline (its HostRows is pickled into them) and must not load jax.
    ("data/pipeline.py", "jax"), ("data/pipeline.py", "blip3o_jax.sharding"),
    ("data/pipeline.py", "blip3o_jax.configlib"),
    # transformers costs seconds to import; only code that tokenizes pays it.
    ("data/pipeline.py", "transformers"), ("data/synthetic.py", "transformers"), ("checkpoints.py", "transformers"),
    ("data/synthetic.py", "tokenizers"), ("data/samples.py", "tokenizers"),
    # Grain workers import data.sources: each reader loads only what its format needs (grain imports jax).
    ("data/sources.py", "grain"), ("data/sources.py", "msgpack"), ("data/sources.py", "array_record"),
    ("data/sources.py", "ml_dtypes"), ("data/sources.py", "tensorflow_datasets"),
    # tensorboardX imports torch whenever it is installed.
    ("metrics.py", "tensorboardX"),
    # A private jax module, guarded by try/except: a future jax may move it.
    ("distributed.py", "jax._src"),
    # Pickle checkpoints are read only when the user allows them explicitly.
    ("weights.py", "torch"),
}


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "lint-imports not installed (requirements-dev.txt: import-linter)"
    out = subprocess.run([exe, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "broken" not in out.stdout.lower().split("contracts:")[-1].split(",")[0]


def _function_level_imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    yield from ((inner.lineno, a.name) for a in inner.names)
                elif isinstance(inner, ast.ImportFrom) and inner.module and not inner.level:
                    if inner.module == "blip3o_jax":
                        yield from ((inner.lineno, f"blip3o_jax.{a.name}") for a in inner.names)
                    else:
                        yield inner.lineno, inner.module


def test_imports_are_at_module_top_unless_deliberately_lazy():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, module in _function_level_imports(path):
            top = module.split(".")[0]
            ours = ".".join(module.split(".")[:2]) if top == "blip3o_jax" else top
            if (rel, ours) in LAZY or (rel, module) in LAZY or top in sys.stdlib_module_names:
                continue
            found.append(f"blip3o_jax/{rel}:{line} imports {module} inside a function")
    assert not found, "\n".join(found)


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_grain_worker_modules_do_not_load_jax():
    loaded = _modules_loaded_by("import blip3o_jax.data.samples, blip3o_jax.data.sources, blip3o_jax.data.synthetic")
    assert not {"jax", "flax", "torch"} & loaded


def test_the_runtime_does_not_load_torch():
    loaded = _modules_loaded_by("import blip3o_jax.train, blip3o_jax.generate, blip3o_jax.convert, "
                                "blip3o_jax.inference, blip3o_jax.checkpoints")
    assert not {"torch", "diffusers", "timm"} & loaded
