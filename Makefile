# One-command setup, demo and tests. Everything runs inside .venv; the CPU build of
# torch is pinned by constraints.txt (pyproject.toml keeps torch>=2.3 for GPU users).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray's local instance, its dashboard and every test stay on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(PY) orchestrate/tune.py --space search_spaces/lr.yaml

# `make test` runs in two processes (TEST_WORKERS=0 for one). The slow tier (tests/conftest.py
# SLOW_MODULES: Ray, learning, benchmark and report tests) is one unit of xdist's work, so one
# process runs it module after module, as one process did before; the other runs the fast tier.
# Two processes each taking whole modules of the slow tier (--dist loadfile) did not pay on two
# cores (2026-12-01: 34 min against about 37 in one, and a two-worker preemption test ran past
# its timeout): the Ray tests are CPU-bound. The fast tier has no Ray and runs in two processes
# (FAST_WORKERS=0 for one).
TEST_WORKERS ?= 2
FAST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

test-fast: setup
	$(PY) -m pytest -q -n $(FAST_WORKERS) --dist loadfile -m "not slow"

bench: setup
	for b in benchmarks/*.py; do \
		case $$b in *search_quality.py) $(PY) $$b replay || exit 1 ;; *) $(PY) $$b || exit 1 ;; esac; \
	done

clean:
	rm -rf $(VENV) runs data .pytest_cache
