# CPU environment in .venv with pinned versions (requirements/cpu.txt); GPU users: see README.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test test-fast lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements/cpu.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/cpu.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test: install  ## everything, slow tests included (what CI runs); tests/core alone, with megatron and DeepSpeed blocked
	$(BIN)/ruff check .
	SAD3_CORE_ONLY=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/core
	$(BIN)/python -m pytest -q --timeout 1200 tests --ignore=tests/core

test-fast: install  ## skip the tests marked slow
	SAD3_CORE_ONLY=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/core
	$(BIN)/python -m pytest -q -m "not slow" tests --ignore=tests/core

lint: install
	$(BIN)/ruff check .

demo:
	bash launchers/demo.sh

bench: install
	$(BIN)/python tools/bench_training.py

clean:
	rm -rf $(VENV) runs .pytest_cache
