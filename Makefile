# The two commands of README.md's quick start. Both are idempotent: the virtual environment is
# created and (re)installed only when it is missing or a requirements file changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# Two test processes: XLA compilation, most of the suite's time, uses one core each. Whole files go to
# one process (--dist loadfile), so module fixtures are built once.
PYTEST_WORKERS ?= 2

.PHONY: demo test smoke clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Embedded default: synthetic data, every stage, sample images and DIR/report.json.
demo: $(VENV)/.runtime
	$(PY) -m blip3o_jax.train --config configs/demo.py --workdir $(WORKDIR)

# Whole test suite (8 fake CPU devices, tiny configs, PyTorch parity references).
test: $(VENV)/.dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=15 tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
