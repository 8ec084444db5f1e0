# One-command setup, demo and tests. Everything runs inside .venv; the CPU build of
# torch is pinned by constraints.txt (pyproject.toml keeps torch>=2.3 for GPU users).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray's local instance, its dashboard and every test stay on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

# The fast tier: everything but the Ray sweeps and clusters, the learning test and the
# benchmark smoke runs and the report's browser and client tests (about a minute on an idle 2-core machine).
SLOW_TESTS := tests/test_sweep.py tests/test_cluster.py tests/test_chaos.py tests/test_benchmarks.py tests/test_benchmarks_on_ray.py tests/test_learning.py \
	tests/test_search_quality.py tests/test_search_quality_replay.py tests/test_report.py tests/test_sweep_objectives.py

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(PY) orchestrate/tune.py --space search_spaces/lr.yaml

# `make test` runs in one process. Two pytest-xdist processes (TEST_WORKERS=2) do not pay on two
# cores: the Ray tests are CPU-bound, and beside the other process's training tests they ran
# twice as long; with every Ray module kept in one process (2026-12-01, fresh clone) the suite
# took 34 min against about 37 in one, and a two-worker preemption test ran past its timeout.
# The fast tier has no Ray and runs in two processes, whole modules each (FAST_WORKERS=0 for one).
TEST_WORKERS ?= 0
FAST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

test-fast: setup
	$(PY) -m pytest -q -n $(FAST_WORKERS) --dist loadfile $(addprefix --ignore=,$(SLOW_TESTS))

bench: setup
	for b in benchmarks/*.py; do \
		case $$b in *search_quality.py) $(PY) $$b replay || exit 1 ;; *) $(PY) $$b || exit 1 ;; esac; \
	done

clean:
	rm -rf $(VENV) runs data .pytest_cache
