"""`ray job submit` against a private head, then the MLflow REST API against the job's store.

Both servers bind 127.0.0.1 on free ports and are stopped by process group (never `ray stop`,
which would kill every Ray process on the machine).
"""

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from support import clean_env, free_port, mlflow_server, process_group, wait_http

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"

pytestmark = pytest.mark.slow


def _env() -> dict:
    return clean_env(PATH=f"{BIN}:{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")


def test_ray_job_submit_then_mlflow_server_finds_the_run(tmp_path):
    env = _env()
    dashboard = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
    }
    head_args = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus=8",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        *[f"{k}={v}" for k, v in ports.items()],
    ]
    out_dir = tmp_path / "out"  # absolute: the job's working directory is a temporary copy
    with process_group(head_args, env, tmp_path / "head.log"):
        wait_http(f"http://127.0.0.1:{dashboard}/api/version", 120)
        submit = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                f"http://127.0.0.1:{dashboard}",
                "--working-dir",
                ".",
                "--runtime-env",
                "examples/runtime_env.yaml",
                "--",
                "python",
                "jobs/tvkd.py",
                "--config",
                "examples/tiny.yaml",
                "--run.output_dir",
                str(out_dir),
                "--run.name",
                "submitted",
                "--train.max_steps",
                "2",
                "--data.eval_path",
                "null",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
        assert "mlflow ui --backend-store-uri" in log and "--host 127.0.0.1" in log

    store = out_dir / "mlflow.db"
    assert store.exists()
    with mlflow_server(store, tmp_path / "mlflow.log") as (base, _):
        with urllib.request.urlopen(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tvkd-ray"
        ) as r:
            experiment_id = json.load(r)["experiment"]["experiment_id"]
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as r:
            runs = json.load(r)["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["run_name"] == "submitted"
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "loss" in metrics and "rewards/accuracies" in metrics
    assert (out_dir / "submitted" / "model" / "model.safetensors").exists()
    assert shutil.which("ray", path=str(BIN))


def test_job_runtime_env_gives_workers_what_fit_gives_its_own_cluster():
    import yaml

    from tvkd_ray import runtime

    env_vars = yaml.safe_load((REPO / "examples" / "runtime_env.yaml").read_text())["env_vars"]
    assert env_vars == runtime.job_env_vars()
