# Two commands do everything on a fresh machine:
#   make demo   the whole pipeline on the built-in synthetic dataset
#   make test   the test suite
# NVIDIA GPU users: make demo REQUIREMENTS=requirements-gpu.txt

PYTHON ?= python3
REQUIREMENTS ?= requirements.txt
VENV := .venv
BIN := $(VENV)/bin

# The demo (demo.py, where its settings are): a synthetic dataset of 80 training and 30 test studies,
# a tiny CNN per fold at 128x128 from scratch (offline, minutes on a CPU), two feature selections
# compared out of fold, the fold ensemble's validated submission, Grad-CAM pictures and the test
# scores of the prior, the CNNs alone and CNN+LSTM.

.PHONY: setup demo test bench

$(VENV)/.installed: requirements.txt requirements-base.txt requirements-gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python demo.py

test: setup
	$(BIN)/python -m pytest -q

# The self-contained benchmarks; bench/segment.py needs a trained U-Net run,
# bench/synthetic_to_real.py trains two demo chains (about 15 minutes) and bench/folder.py writes a
# 10,000-slice DICOM folder (5 GB, about 20 minutes on 2 cores): run those by hand.
BENCHMARKS := machine preprocess input embed cache_check lstm study_latency study_mode_latency gradcam

bench: setup
	for name in $(BENCHMARKS); do $(BIN)/python bench/$$name.py || exit 1; done
