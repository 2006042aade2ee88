# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create or reuse .venv and install the pinned set from requirements.txt (first run only).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_runs
STUDY_DIR ?= study_runs
PYTEST_ARGS ?=

.PHONY: venv test test-all test-slow demo demo-quick study lint bench clean-demo

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Default suite: everything but the tests marked slow (multi-process, simulator, end-to-end).
test: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(PY) -m pytest -m "slow" $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) vla-scripts/demo.py --output_dir $(DEMO_DIR)

demo-quick: venv
	$(PY) vla-scripts/demo.py --output_dir $(DEMO_DIR)/quick --quick True

# Every method and sweep over 3 seeds on the demo's data and θ0 (≤ 45 min on 2 cores; resumable).
study: venv
	$(PY) vla-scripts/study.py --output_dir $(STUDY_DIR)

lint: venv
	$(VENV)/bin/ruff check .

bench: venv
	$(PY) vla-scripts/bench_craft.py

clean-demo:
	rm -rf $(DEMO_DIR)
