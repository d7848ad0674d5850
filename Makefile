# Two commands do everything on a fresh machine:
#   make demo   the whole pipeline on the built-in synthetic dataset
#   make test   the test suite
# NVIDIA GPU users: make demo REQUIREMENTS=requirements-gpu.txt

PYTHON ?= python3
REQUIREMENTS ?= requirements.txt
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench

$(VENV)/.installed: requirements.txt requirements-base.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python prepare_data.py --synthetic --dataset synthetic

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done
