"""Several Ray nodes on this machine (``ray.cluster_utils.Cluster``), one of them removed mid-run:
the run finishes through ``tvkd_ray.fit`` on the running cluster, every pair of every epoch is
trained exactly once, and MLflow holds one finished run. Each scenario runs in its own process
(tests/cluster_scenarios.py), so its cluster never meets the session's."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from support import clean_env

SCENARIOS = Path(__file__).with_name("cluster_scenarios.py")
# Each scenario starts a cluster of three nodes and trains two epochs: minutes, make test-e2e.
pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.e2e]


def _scenario(name: str, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCENARIOS), name, str(out)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    # Ray may print a raylet line after the report: take the report's own line.
    (report,) = [line for line in proc.stdout.splitlines() if line.startswith('{"')]
    return json.loads(report)


def _assert_every_pair_once_per_epoch(report: dict) -> None:
    seen = Path(report["run_dir"]) / "pairs_seen"
    for epoch in (0, 1):
        ids = np.load(seen / f"epoch{epoch}.npy")
        assert sorted(ids.tolist()) == list(range(report["num_pairs"])), f"epoch {epoch}"


def _one_finished_run(report: dict) -> mlflow.entities.Run:
    client = mlflow.MlflowClient(report["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tvkd-ray").experiment_id])
    assert [r.info.run_id for r in runs] == [report["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    return runs[0]


def test_losing_the_teacher_node_mid_epoch_loses_no_pair(tmp_path):
    """Trainers pinned to the head (train.resources_per_worker), teacher and reference on two
    scorer nodes (teacher.resources / reference.resources), cache none, 2 epochs: the node
    running the teacher goes mid-epoch; Ray Data restarts the actor on the other scorer node
    and retries its blocks, and the trainers never notice. Two workers evaluate one pair."""
    report = _scenario("scorer-node", tmp_path)
    assert report.get("node"), "no node was removed"
    assert report["epochs_finished_before"] == 0  # removed in epoch 0
    _assert_every_pair_once_per_epoch(report)
    run = _one_finished_run(report)
    assert "tvkd.resumed_from_step" not in run.data.tags  # no trainer had to restart
    assert run.data.metrics["tvkd/potential_mean"] != 0
    assert run.data.metrics["eval/num_pairs"] == 1


def test_losing_the_trainer_node_resumes_from_the_last_checkpoint(tmp_path):
    """The worker's node goes after a checkpoint: Ray Train restarts the worker on the spare
    node, which resumes from that checkpoint in the same MLflow run."""
    report = _scenario("trainer-node", tmp_path)
    assert report.get("node"), "no node was removed"
    assert report["epochs_finished_before"] == 0
    _assert_every_pair_once_per_epoch(report)
    run = _one_finished_run(report)
    assert int(run.data.tags["tvkd.resumed_from_step"]) >= 2
    assert report["step"] == 48  # 96 pairs / 4 per step, 2 epochs: no step lost or repeated
