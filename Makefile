# ddp_seq -- `make train` is the main job; `make help` lists every target.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
CONFIG ?= configs/default.yaml
NPROC ?= 2
ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(TORCH_VERSION)

.DEFAULT_GOAL := help
.PHONY: help install train train-dp train-single test test-fast lint bench gpu-check parity samples corpus slurm-up slurm-down slurm-submit clean

help:  ## list the targets
	@echo "ddp_seq make targets (overrides: CONFIG=$(CONFIG) NPROC=$(NPROC) ARGS='section.key=value ...'):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-14s %s\n", $$1, $$2}'

# torch goes in first, pinned, so installing the package never makes pip pick another build.
# The [bench] extra (pytorch-lightning, matplotlib) is never a dependency of ddp_seq itself; it is
# installed here so `make test` runs the Lightning peer of the benchmark on a tiny size. [all] adds
# the optional formats, tokenizers, TensorBoard and ONNX export, so the tests cover them. Installing
# them leaves torch alone (checked on the last line).
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,all]"
	$(BIN)/python -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH_VERSION)', torch.__version__"
	touch $@

install: $(STAMP)  ## create .venv: torch (TORCH_VERSION) first, then this package with dev, bench and every optional extra

# The config is checked first (fast, no torch): a bad key fails with one line and exit code 2
# instead of one error per rank under torchrun.
train: $(STAMP)  ## train CONFIG on NPROC ranks with torchrun (the main job)
	@$(BIN)/python -m ddp_seq check-config --config $(CONFIG) $(ARGS) >/dev/null
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) train.py --config $(CONFIG) $(ARGS)

train-dp: $(STAMP)  ## train CONFIG in the legacy nn.DataParallel mode (one process, every visible GPU)
	@$(BIN)/python -m ddp_seq check-config --config $(CONFIG) training.mode=dp $(ARGS) >/dev/null
	$(BIN)/python train.py --config $(CONFIG) training.mode=dp $(ARGS)

train-single: $(STAMP)  ## train CONFIG in one process, no torchrun
	$(BIN)/python train.py --config $(CONFIG) $(ARGS)

samples: $(STAMP)  ## write tiny sample files of every data format into data/samples (for configs/*-*.yaml)
	$(BIN)/ddp-seq make-data samples --out data/samples

corpus: $(STAMP)  ## build the stdlib-lines text corpus into data/stdlib (for configs/stdlib-lines.yaml)
	$(BIN)/ddp-seq make-data stdlib --out data/stdlib

test: $(STAMP)  ## the whole test suite (real torchrun processes on gloo)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the tests not marked slow (no torchrun launches)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check ddp_seq tests train.py launch

bench: $(STAMP)  ## reference vs ddp_seq vs Lightning, side by side; bench/results/<date>-<host>.json + BENCHMARKS.md (~70 min)
	$(BIN)/ddp-seq bench --suite default

# The GPU machine has no .venv and no network (issue 28): there the check runs from the working
# tree with plain python3, so this target installs nothing; here it uses the virtualenv if present.
GPU_CHECK_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:  ## every CUDA path + the GPU benchmark (< 8 min): bench/results/<date>-<gpu>.json + BENCHMARKS.md; no CUDA: dry run
	PYTHONPATH=. $(GPU_CHECK_PYTHON) launch/gpu_check.py $(GPU_CHECK_ARGS)

parity: $(STAMP)  ## single vs dp vs ddp (2 ranks): same loss and gradients on a fixed batch, or exit 1
	$(BIN)/torchrun --standalone --nproc_per_node=2 -m ddp_seq parity

slurm-up:  ## start a real single-node Slurm on this machine (installs it with apt; root)
	launch/slurm/local-cluster.sh up

slurm-down:  ## stop that Slurm
	launch/slurm/local-cluster.sh down

SBATCH_ARGS ?= --partition=debug --time=30
slurm-submit: $(STAMP)  ## sbatch CONFIG through launch/slurm/train.sbatch, follow the log, print where results are
	@$(BIN)/python -m ddp_seq check-config --config $(CONFIG) $(ARGS) >/dev/null
	launch/slurm/submit.sh $(SBATCH_ARGS) -- --config $(CONFIG) $(ARGS)

clean:  ## remove runs/, data/ (generated), caches and .venv
	rm -rf runs data .pytest_cache .ruff_cache $(VENV) *.egg-info
