# BidirUncertaintySeg developer commands. Everything runs in a local virtual environment
# (.venv) that the first target creates: torch is pinned to 2.13.0 and installed first so
# that no other requirement pulls a different (multi-GB CUDA) build, then the project with
# the pinned versions in constraints.txt.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_output
PYTEST_ARGS ?=

.PHONY: all install demo test lint format bench bench-speed bench-quality clean distclean

all: test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -c constraints.txt -e ".[test,slicer-tests]"
	touch $(STAMP)

install: $(STAMP)

## The demo: synthetic data, training (ours and supervised), segmentation with uncertainty, report.
demo: $(STAMP)
	$(BIN)/buseg demo --out $(DEMO_OUT)

## Lint, then the whole test suite (per-test timeout in pyproject.toml).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check BidirUncertaintySeg/Logic/buseg

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format BidirUncertaintySeg/Logic/buseg

## Benchmarks, CPU presets (results go to benchmarks/results/).
bench: bench-speed bench-quality

bench-speed: $(STAMP)
	$(BIN)/python benchmarks/speed.py --preset cpu

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py --preset cpu

clean:
	rm -rf $(DEMO_OUT) build dist .pytest_cache .ruff_cache .hypothesis benchmarks/work
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +
	find . -name "*.egg-info" -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
