# Two commands do everything on a fresh machine:
#   make demo   the whole pipeline on a synthetic dataset (bleeds inserted into real normal series, else phantoms)
#   make test   the test suite
# NVIDIA GPU users: make demo REQUIREMENTS=requirements-gpu.txt

PYTHON ?= python3
REQUIREMENTS ?= requirements.txt
VENV := .venv
BIN := $(VENV)/bin

# The demo (demo.py, where its settings are): a synthetic dataset of 80 training and 30 test studies,
# a tiny CNN per fold at 128x128 from scratch (offline, minutes on a CPU), two feature selections
# compared out of fold, the fold ensemble's validated submission, Grad-CAM pictures and the test
# scores of the prior, the CNNs alone and CNN+LSTM. Where real bleed-free RSNA series are beside the
# project (REAL_NORMAL), the dataset's bleeds are inserted into them (real anatomy); without them, the
# phantom (no real data needed). Where the real labeled RSNA series are (REAL_LABELED), the
# ensemble's scores on them at the end.
REAL_NORMAL ?= ../shared/data/real/rsna_normal
REAL_LABELED ?= ../shared/data/real/rsna_labeled

.PHONY: setup demo paper test bench

# One stamp per requirements file: switching REQUIREMENTS (CPU to GPU) builds the environment afresh
# instead of keeping the other TensorFlow build.
STAMP := $(VENV)/.installed-$(basename $(notdir $(REQUIREMENTS)))

$(STAMP): $(REQUIREMENTS) requirements-base.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r $(REQUIREMENTS)
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/python demo.py $(if $(wildcard $(REAL_NORMAL)/stage_2_train),--backgrounds $(REAL_NORMAL)) \
		$(if $(wildcard $(REAL_LABELED)/stage_2_train.csv),--score-real $(REAL_LABELED))

# The paper's recipe on the real challenge data, from download to submission: every stage with --preset
# paper (README.md, "Reproduce the paper on a GPU"). Needs a Kaggle account with the competition's rules
# accepted, about 640 GB of free disk while the download unpacks and a GPU (make paper
# REQUIREMENTS=requirements-gpu.txt); the hours each stage takes are worked out in BENCHMARKS.md. Rerun
# after an interruption: every stage keeps what it finished.
PAPER_RUN := rsna-paper

paper: setup
	$(BIN)/python prepare_data.py --download --dataset rsna --preset paper
	$(BIN)/python train_cnn.py --dataset rsna --run $(PAPER_RUN) --preset paper
	$(BIN)/python train_lstm.py --run $(PAPER_RUN) --preset paper
	$(BIN)/python predict.py --run $(PAPER_RUN) --selection pca:120 --submit

test: setup
	$(BIN)/python -m pytest -q

# The self-contained benchmarks; bench/segment.py needs a trained U-Net run,
# bench/synthetic_to_real.py trains two demo chains (about 15 minutes), bench/phantom_transfer.py six
# one-fold chains (about 15 minutes), bench/inserted_transfer.py eight (about 45 minutes),
# bench/folder.py writes a
# 10,000-slice DICOM folder (5 GB, about 20 minutes on 2 cores) and bench/rehearsal.py runs every stage on
# a synthetic tenth of the real dataset (43 GB of DICOM, about 25 minutes): run those by hand.
BENCHMARKS := machine preprocess input embed cache_check lstm study_latency study_mode_latency gradcam inner_table

bench: setup
	for name in $(BENCHMARKS); do $(BIN)/python bench/$$name.py || exit 1; done
