"""The README's cluster commands exactly as written (`make cluster`, `make submit ARGS=...`,
`make cluster-stop`), then the MLflow REST API against the submitted job's store.

They run in a fresh shell: no virtualenv on PATH, no RAY_* variables, and a home where an
earlier local run left ~/.ray/auth_token (with RAY_AUTH_MODE unset, such a token turned the
head's token authentication on while `ray job submit` sent none). The Makefile's CLUSTER_*
variables give the head free ports and its own pid folder, so that the commands never meet
another cluster on this machine; the commands themselves are the README's.
"""

import json
import os
import re
import shlex
import subprocess
import urllib.request
import uuid
from pathlib import Path

import pytest
from support import clean_env, free_port, mlflow_server

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
HEAD_PORTS = (
    "--port",
    "--ray-client-server-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
    "--runtime-env-agent-port",
    "--dashboard-agent-grpc-port",
)

pytestmark = pytest.mark.slow


def readme_cluster_commands() -> dict[str, str]:
    """The `make` lines of the README's cluster block, by target."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "make cluster" in b]
    lines = [line for line in block.splitlines() if line.startswith("make ")]
    return {shlex.split(line, comments=True)[1]: line for line in lines}


def fresh_shell_env(home: Path, cluster_dir: Path, dashboard: int) -> dict:
    """A login shell's environment: the venv off PATH, no Ray settings, its own home."""
    venv_bins = {str(VENV_BIN), f"{os.environ.get('VIRTUAL_ENV')}/bin"}
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p not in venv_bins)
    env = {k: v for k, v in clean_env().items() if not k.startswith("RAY_") and k != "VIRTUAL_ENV"}
    flags = " ".join(f"{flag}={free_port()}" for flag in HEAD_PORTS)
    return {
        **env,
        "PATH": path,
        "HOME": str(home),
        "CLUSTER_PORT": str(dashboard),
        "CLUSTER_AGENT_PORT": str(free_port()),
        "CLUSTER_FLAGS": flags,
        "CLUSTER_DIR": str(cluster_dir),
    }


@pytest.mark.e2e  # a head, a job and its own fit: minutes
def test_readme_cluster_commands_submit_a_job_then_mlflow_finds_the_run(tmp_path):
    commands = readme_cluster_commands()
    assert set(commands) == {"cluster", "submit", "cluster-stop"}
    home, cluster_dir = tmp_path / "home", tmp_path / "cluster"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(uuid.uuid4().hex)  # left by an earlier run
    env = fresh_shell_env(home, cluster_dir, free_port())

    def shell(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            shell=True,
            executable="/bin/bash",
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )

    started = shell(commands["cluster"])
    try:
        assert started.returncode == 0, (started.stdout + started.stderr)[-4000:]
        group = int((cluster_dir / "head.pid").read_text())
        submit = shell(commands["submit"])
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
        assert "mlflow ui --backend-store-uri" in log and "--host 127.0.0.1" in log
    finally:
        stopped = shell(commands["cluster-stop"])
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    with pytest.raises(ProcessLookupError):  # the head's whole process group is gone
        os.killpg(group, 0)

    out_dir = home / "tvkd-ray-outputs"  # the README's --run.output_dir, in the job's home
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
    assert run["info"]["run_name"] == "tiny"
    assert run["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert "loss" in metrics and "rewards/accuracies" in metrics
    assert (out_dir / "tiny" / "model" / "model.safetensors").exists()


def test_job_runtime_env_gives_workers_what_fit_gives_its_own_cluster():
    import yaml

    from tvkd_ray import runtime

    env_vars = yaml.safe_load((REPO / "examples" / "runtime_env.yaml").read_text())["env_vars"]
    assert env_vars == runtime.job_env_vars()
