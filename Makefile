# aotlib: `make figures` regenerates every figure, `make test` runs every check.
# Both create the virtual environment from requirements.txt on first use.

VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SCALE   ?= cpu
NBTMP   := $(shell mktemp -d -u /tmp/aotlib-nbval-XXXXXX)
export PYTHONHASHSEED := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv figures test lint format unit nbval nbval-refs lab bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . || $(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)  ## create the virtual environment (done by every target that needs it)

figures: $(STAMP)  ## run every notebook (SCALE=cpu|smoke|paper, FRESH=1 retrains, ONLY="01 03")
	$(PY) tools/run_notebooks.py --scale $(SCALE) $(if $(filter-out 0,$(FRESH)),--fresh) $(if $(ONLY),--only $(ONLY))

test: lint unit nbval  ## lint, unit tests, then every notebook at smoke scale (nbval)

lint: $(STAMP)  ## ruff linter and formatter check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)  ## apply the ruff formatter and safe fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

unit: $(STAMP)  ## the pytest unit tests
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

# Smoke runs train tiny models: one thread each (two notebooks at a time) keeps their
# printed numbers bit-identical to the committed references.
nbval: $(STAMP)  ## re-execute the smoke-scale notebooks and compare with tests/nbval
	OMP_NUM_THREADS=1 AOTLIB_FIGURES=$(NBTMP) $(PY) -m pytest -q -n 2 --dist loadfile \
		--nbval tests/nbval --nbval-sanitize-with tests/nbval/sanitize.cfg \
		--nbval-cell-timeout 600
	rm -rf $(NBTMP)

nbval-refs: $(STAMP)  ## regenerate the smoke-scale nbval references after editing a notebook
	OMP_NUM_THREADS=1 $(PY) tools/run_notebooks.py --scale smoke --out tests/nbval

lab: $(STAMP)  ## open JupyterLab on the notebooks
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)  ## benchmarks: SSD paths and training throughput (prints ratios)
	$(PY) -m aotlib.bench ssd
	$(PY) -m aotlib.bench train

# Not the virtual environment: a GPU machine keeps its own torch and triton (the pinned
# ones can't be installed offline), so this runs the machine's python, PYTHON=... to pick
# another, with the repo on PYTHONPATH (or `pip install --no-deps --no-build-isolation -e .`).
gpu-check:  ## CUDA machine, its own python (PYTHON=...): kernels, 130m model, timings -> results/gpu/
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(or $(PYTHON),python3) tools/gpu_check.py

clean:  ## remove the virtual environment and caches (not results or figures)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
