"""The environment of every process tvkd-ray starts or joins: one home for it.

``fit`` gives a cluster it starts ``RAY_ENV``; the teacher and reference pools add
``ACTOR_ALLOCATOR_ENV``; the trainers apply ``MLFLOW_CLIENT_ENV``; tests, the benchmarks and the
load test start their clusters with the same dicts; ``examples/runtime_env.yaml`` (for
``ray job submit``) is checked against :func:`job_env_vars` by the test suite.
"""

from __future__ import annotations

import os

# glibc settings for the CPU processes (the actor pools override them): large blocks come from
# the heap and stay there for the next step. Otherwise every LM-head buffer is a fresh mmap,
# zero-filled page by page: ~30 % of a CPU training step (docs/BENCHMARKS.md). glibc reads them
# at process start, so they only act through the environment a process is started with.
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20)}
# The teacher and reference actors (and the memory probes, which measure what they hold) return
# blocks of 1 MiB or more to the OS on free: in a heap, their chunk-sized LM-head buffers fragment
# it and RSS creeps towards the full logits (901 MiB peak for chunked potentials of 8,192
# positions x 49,152, against 221 MiB). The page faults this costs them are off the critical path
# while they keep ahead of the trainers (on 2 cores they only just do: docs/BENCHMARKS.md).
ACTOR_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_MMAP_MAX_": "65536"}
# Ray Train's V2 API, no usage reporting, no tokenizer threads fighting Ray's: every process of
# a run, the driver included.
PROCESS_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# What a run prints is the driver's console (driver/console.py): the libraries' progress bars and
# INFO logs stay off in every process unless TVKD_VERBOSE=1 (jobs/tvkd.py --verbose); their
# warnings and errors still show.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_DATA_LOG_LEVEL": "WARNING",
}
VERBOSE_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "0",
    "MLFLOW_LOGGING_LEVEL": "INFO",
    "RAY_DATA_LOG_LEVEL": "INFO",
}
VERBOSE_FLAG = "TVKD_VERBOSE"
# Every process of a cluster that fit() starts itself.
RAY_ENV = {**PROCESS_ENV, **ALLOCATOR_ENV, **QUIET_ENV}
# Usage reporting is the cluster's choice, not a job's: a submitted job gives its workers the rest.
_CLUSTER_CHOICES = ("RAY_USAGE_STATS_ENABLED",)
# Variables of the driver's environment that its cluster's processes need too.
PASSED_THROUGH = (
    "HF_HUB_OFFLINE",
    "TVKD_CACHE_DIR",
    "TVKD_FAULT",
    "TVKD_FAULT_FILE",
    VERBOSE_FLAG,
    *QUIET_ENV,  # --verbose sets them in the driver
)
# MLflow's HTTP client retries for minutes by default; training must not wait that long.
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# Machines without the hub (tests, benchmarks, the load test): local models only (SPEC §9).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# A private local cluster of a benchmark or the load test: offline, no auth prompt, no usage
# reporting; otherwise Ray's defaults, so that timings are those of a user's run.
PRIVATE_CLUSTER_ENV = {**PROCESS_ENV, **OFFLINE_ENV, "RAY_AUTH_MODE": "disabled"}
# The test suite's cluster on top: Ray Train's controller polling fast enough for few-second
# runs, no preemption watcher (SPEC §9).
TEST_CLUSTER_ENV = {
    **PRIVATE_CLUSTER_ENV,
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def verbose() -> bool:
    """Whether this run shows the libraries' own output (``--verbose``)."""
    return os.environ.get(VERBOSE_FLAG) == "1"


def make_verbose() -> None:
    """Bring back the libraries' progress bars and INFO logs in this process and the clusters
    it starts (set before fit(); a submitted job's workers keep its runtime env's)."""
    os.environ.update({VERBOSE_FLAG: "1", **VERBOSE_ENV})


def set_defaults(env: dict[str, str]) -> None:
    """Give this process each variable of ``env`` it does not set itself."""
    for key, value in env.items():
        os.environ.setdefault(key, value)


def cluster_env_vars() -> dict[str, str]:
    """``runtime_env["env_vars"]`` of a cluster this process starts: RAY_ENV plus what it passes
    through from its own environment."""
    return {**RAY_ENV, **{k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}}


def job_env_vars() -> dict[str, str]:
    """What ``examples/runtime_env.yaml`` must give a submitted job's processes."""
    return {k: v for k, v in RAY_ENV.items() if k not in _CLUSTER_CHOICES}
