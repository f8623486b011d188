# posewire: `make run` and `make test` are the whole quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels-compiled
# pytest's own options for `make unit`, e.g. `make unit PYTEST_ARGS='-x tests/test_ring.py'`
PYTEST_ARGS ?=

.PHONY: install run test lint imports typecheck unit coverage-report bench clean

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

lint: install imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# the architecture: import-linter contracts in pyproject.toml [tool.importlinter]
imports: install
	$(VENV)/bin/lint-imports

typecheck: install
	$(VENV)/bin/mypy

# pytest under coverage, across every process the tests start (docs/coverage.md),
# in the two passes below, then the codec tests once more with the numba kernels run as plain Python
# (NUMBA_DISABLE_JIT=1: compiled code is not traced; ~45 s). The coverage table is
# printed whatever the outcome; the exit status is pytest's (5, "no tests
# collected", is a failure too).
KERNEL_TESTS := tests/test_protocol.py
# merge the per-process data files, print the per-file table (lowest first) and the total
COVERAGE_REPORT = $(PY) -m coverage combine --quiet; \
	$(PY) -m coverage report --sort=cover; \
	echo "coverage of pipeline/ + stages/ (every process): $$($(PY) -m coverage report --format=total)%"

# Two pytest passes (docs/testing.md): the tests that assert no time run on
# $(WORKERS) xdist workers, one test module per worker at a time; those marked
# `timing` (latency, detection-time or rate bounds) or `serial` (they watch something
# machine-wide, e.g. the sweep of stale shared memory) then run alone, so that no other
# test decides them. With PYTEST_ARGS one plain pass runs what they select.
WORKERS ?= 3
PARALLEL := -n $(WORKERS) --dist loadfile -m "not timing and not serial"
ALONE := -m "timing or serial"
unit: install
	rm -f .coverage .coverage.*
	status=0; \
	if [ -n "$(PYTEST_ARGS)" ]; then \
	  $(PY) -m coverage run -m pytest -q --durations=15 $(PYTEST_ARGS) || status=$$?; \
	else \
	  $(PY) -m coverage run -m pytest -q --durations=15 $(PARALLEL) || status=$$?; \
	  $(PY) -m coverage run -m pytest -q --durations=15 $(ALONE) || { s=$$?; [ $$status != 0 ] || status=$$s; }; \
	  NUMBA_DISABLE_JIT=1 $(PY) -m coverage run -m pytest -q -p no:cacheprovider \
	    $(KERNEL_TESTS) || { s=$$?; [ $$status != 0 ] || status=$$s; }; \
	fi; \
	$(COVERAGE_REPORT); \
	if [ $$status = 5 ]; then echo "pytest collected no tests: that is a failure" >&2; fi; \
	if [ $$status = 0 ] && [ -z "$(PYTEST_ARGS)" ] && ! $(PY) -m coverage report --format=total >/dev/null; then \
	  echo "coverage is under fail_under (pyproject.toml)" >&2; status=1; fi; \
	exit $$status

coverage-report: install
	$(COVERAGE_REPORT)

test: lint typecheck unit

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
	rm -f .coverage .coverage.*
