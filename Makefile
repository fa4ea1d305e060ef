# BidirUncertaintySeg developer commands. Everything runs in a local virtual environment
# (.venv) that the first target creates: torch is pinned to 2.13.0 and installed first so
# that no other requirement pulls a different torch build, then the project with the
# pinned versions in constraints.txt.
#
#   make demo      the whole idea on generated data (a few minutes on 2 CPU cores) -> demo_output/
#   make test      ruff + the whole test suite (per-test timeout in pyproject.toml)
#   make lint      ruff check and ruff format --check;  make format  applies both (format, check --fix)
#   make bench     the benchmarks' CPU presets (needs the benchmark data, see docs/benchmarks.md)
#   make gpu-check on a CUDA machine, in 8 min: CUDA tests, training/inference speed, DDP smoke test
#                  -> benchmarks/results/gpu_<card>.md/.json (GPU_CHECK_ARGS, e.g. "--budget-seconds 600")
#   make clean     build/test/demo leftovers;  make distclean  also the virtual environment
#
# Variables: PYTHON (the interpreter that creates .venv, default python3), DEMO_OUT,
# PYTEST_ARGS (e.g. PYTEST_ARGS="-m 'not slow'"), TORCH_INDEX_URL (e.g.
# https://download.pytorch.org/whl/cpu for the small CPU-only torch, or .../whl/cu126).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_output
DEMO_ARGS ?=
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=
TORCH_INDEX_URL ?=
TORCH_PIN := torch==2.13.0

.PHONY: all install demo test lint format bench bench-speed bench-quality gpu-check clean distclean

all: test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH_PIN)
	$(BIN)/python -m pip install -c constraints.txt -e ".[test,slicer-tests]"
	touch $(STAMP)

install: $(STAMP)

## The demo: synthetic data, training (ours and supervised), segmentation with uncertainty, report.
demo: $(STAMP)
	$(BIN)/buseg demo --out $(DEMO_OUT) $(DEMO_ARGS)

## Lint, then the whole test suite (per-test timeout in pyproject.toml).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Benchmarks, CPU presets (results go to benchmarks/results/): modules of the benchmarks package,
## run from the repository root (python -m benchmarks.<name>).
bench: bench-speed bench-quality

bench-speed: $(STAMP)
	$(BIN)/python -m benchmarks.speed --preset cpu

bench-quality: $(STAMP)
	$(BIN)/python -m benchmarks.quality --preset cpu

## Every GPU figure in one command, within a time budget (docs/benchmarks.md, "GPU check").
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO_OUT) build dist .pytest_cache .ruff_cache .hypothesis benchmarks/work
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
	find . -name "*.egg-info" -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
