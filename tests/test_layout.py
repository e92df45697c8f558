"""No test file imports another: shared PyTorch references and builders live in tests/references/,
shared fixtures in tests/conftest.py."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports_a_test_module(node) -> bool:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # also `from tests import test_x`
    else:
        return False
    return any(part.startswith("test_") for name in names for part in name.split("."))


def test_no_test_file_imports_another():
    files = sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("benchmarks/*.py")])
    assert len(files) > 20
    offenders = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in files
                 for node in ast.walk(ast.parse(path.read_text(), str(path))) if _imports_a_test_module(node)]
    assert not offenders, "import from tests/references/ (or use a conftest fixture) instead: " + ", ".join(offenders)
