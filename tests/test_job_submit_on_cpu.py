"""`ray job submit` against a private head, then the MLflow REST API against the job's store.

Both servers bind 127.0.0.1 on free ports and are stopped by process group (never `ray stop`,
which would kill every Ray process on the machine).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def _process_group(args: list[str], env: dict, log: Path):
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("RAY_ADDRESS", "TVKD_FAULT_FILE", "TVKD_FAULT", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def test_ray_job_submit_then_mlflow_server_finds_the_run(tmp_path):
    env = _env()
    dashboard = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": _free_port(),
        "--ray-client-server-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
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
    with _process_group(head_args, env, tmp_path / "head.log"):
        _wait_http(f"http://127.0.0.1:{dashboard}/api/version", 120)
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
    port = _free_port()
    server = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with _process_group(server, env, tmp_path / "mlflow.log"):
        base = f"http://127.0.0.1:{port}"
        _wait_http(f"{base}/health", 120)
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
