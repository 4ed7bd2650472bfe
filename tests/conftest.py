"""Shared test set-up: offline Hugging Face, a private model cache, one local Ray cluster."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HH_PAIRS = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
sys.path.insert(0, str(REPO_ROOT))

from tvkd_ray import runtime  # noqa: E402  (imports neither ray nor transformers)

# Set before ray/transformers are imported anywhere in the test session.
runtime.set_defaults(runtime.TEST_CLUSTER_ENV)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests never log to a developer's server

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fault_file(tmp_path_factory):
    """A file every process of the test cluster reads fault specs from (actors/faults.py)."""
    path = tmp_path_factory.mktemp("faults") / "fault"
    os.environ["TVKD_FAULT_FILE"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_cluster(fault_file):
    """One local Ray cluster for the whole session (a bare ray.init() would attach to any cluster
    already running on the machine; logical CPUs are over-committed so actor pools never starve)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            # What fit() gives the processes of a cluster it starts (the fault file included).
            "env_vars": runtime.cluster_env_vars()
        },
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def arm_fault(fault_file, tmp_path):
    """Arm one fault (``arm_fault("trainer", 4)``); returns the marker path written when it fires.
    Disarmed after the test."""

    def arm(role: str, count: int) -> Path:
        marker = tmp_path / f"{role}-fault-fired"
        fault_file.write_text(f"{role}:{count}:{marker}")
        return marker

    yield arm
    fault_file.unlink(missing_ok=True)
