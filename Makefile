# MFIM: `make repro` runs the embedded default pipeline end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mfim-installed

# glibc otherwise unmaps/remaps every >32 MB tensor (../shared/PERFORMANCE.md: 45-90% of CPU time at 128 px).
export GLIBC_TUNABLES := glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184
export PATH := $(abspath $(BIN)):$(PATH)
export MLFLOW_ALLOW_FILE_STORE := true
# progress bars redraw at most every 5 s (stage logs stay readable when not on a terminal)
export TQDM_MININTERVAL := 5

.PHONY: setup assets repro demo test test-all bench ui clean-outputs

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: on these machines the pinned builds are local files (no multi-GB download).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(BIN)/mfim assets fetch --quiet

repro: assets
	$(BIN)/dvc repro
	@echo
	@echo "Done. Results:"
	@echo "  metrics   : reports/metrics.json   (dvc metrics show)"
	@echo "  tables    : reports/*.md"
	@echo "  images    : reports/grids/"
	@echo "  tracking  : make ui   -> http://127.0.0.1:5000  (mlflow ui on $(CURDIR)/mlflow.db; it prints the runs' address)"

# one swap with the shipped 64 px model on two held-out people rendered here: no data set, no `make repro`
DEMO_CHECKPOINT := checkpoints/mfim_synth64.pt
demo: assets
	$(BIN)/python -m mfim.demo demo
	$(BIN)/mfim swap --source demo/source.png --target demo/target.png --output demo/swap.png --roi \
		--checkpoint $(DEMO_CHECKPOINT) --overwrite
	$(BIN)/mfim detect demo/swap.png
	@echo
	@echo "demo/swap.png: the source's person in the target's scene (demo/source.png, demo/target.png)."
	@echo "This is the embedded default: a 64 px model trained on synthetic BFM renders, not a photo-realistic"
	@echo "swapper; on photos it pastes a small synthetic face. Photo-realistic swaps need paper scale"
	@echo "(configs/paper.yaml, docs/paper-scale/README.md)."

# the suite, then the paper-scale smoke (issue 11: every stage of configs/paper.yaml on official-format files)
test: assets
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m paper_smoke

test-all: assets
	$(BIN)/python -m pytest -q -m "slow or not slow or paper_smoke"

bench: assets
	$(BIN)/python benchmarks/run_all.py

# MLflow 3.x opens an experiment on its GenAI overview; this address opens the training runs
ui: setup
	@echo "training runs: $$($(BIN)/python -c 'from mfim.config import load_params; from mfim.tracking import ui_url; print(ui_url(load_params()))')"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
