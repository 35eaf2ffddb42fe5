# Every target sets up its own environment first, so each works on a fresh clone.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

# Re-installed only when the lock file or the project metadata change.
$(STAMP): constraints.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m detloop.demo

test: setup lint
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not slow" -q

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The figures the issues ask for; each script prints them and writes bench/results/*.json.
# bench/al_compare.py (3 strategies x 3 seeds of AL) takes hours on 2 cores: run it by hand.
# So do bench/ssl_bench.py and bench/ssl_blocks.py (about an hour each on 2 cores).
BENCHES := data_scale decode selection_scale mc_dropout train_tiny calibration autolabel \
	predict_scaling loop_overhead
bench: setup
	@for b in $(BENCHES); do \
	  if [ -f bench/$$b.py ]; then echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; fi; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
