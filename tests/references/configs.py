"""The repository's experiment configs (configs/*.py) as the tests read them."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py's ``get_config(arg)``; the file is executed afresh, so every call returns a
    ConfigDict of its own that a test may change."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def demo_config(**overrides):
    """The smoke demo config with dotted-path overrides: ``demo_config(**{"train.stage": "generation"})``."""
    cfg = load_config("demo", "smoke")
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
