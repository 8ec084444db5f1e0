# One-command setup, demo and tests. Everything runs inside .venv; the CPU build of
# torch is pinned by constraints.txt (pyproject.toml keeps torch>=2.3 for GPU users).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Ray's local instance, its dashboard and every test stay on loopback.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(PY) orchestrate/tune.py --space search_spaces/lr.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs data .pytest_cache
