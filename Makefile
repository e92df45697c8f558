# The two commands of README.md's quick start. Both are idempotent: the virtual environment is
# created and (re)installed only when it is missing or pyproject.toml or a requirements file changed.
# The package is installed editable (pyproject.toml: ranges, console scripts) together with the exact
# pins of requirements*.txt (-r), which also keep pip from choosing a CUDA torch build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
TESTS ?= tests
# Two test processes: XLA compilation, most of the suite's time, uses one core each. Whole files go to
# one process (--dist loadfile), so module fixtures are built once.
PYTEST_WORKERS ?= 2

.PHONY: demo test clean

$(VENV)/.runtime: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt -e '.[dev]'
	touch $@

# Embedded default: synthetic data, every stage, sample images and DIR/report.json.
demo: $(VENV)/.runtime
	$(PY) -m blip3o_jax.train --config configs/demo.py --workdir $(WORKDIR)

# Whole test suite (8 fake CPU devices, tiny configs, PyTorch parity references); TESTS=tests/test_X.py for one file.
test: $(VENV)/.dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
