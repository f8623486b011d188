# posewire: `make run` and `make test` are the whole quick start.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-compiled

.PHONY: install run test lint typecheck unit bench clean

install: $(STAMP) $(KERNELS)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# compile the codec's numba kernels once, not in the first run or test that needs them
$(KERNELS): $(STAMP) pipeline/codec/kernels.py
	$(PY) -c 'from pipeline.codec import warm_kernels; warm_kernels()'
	touch $(KERNELS)

run: install
	$(PY) -m pipeline pipeline.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q

test: lint typecheck unit

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
