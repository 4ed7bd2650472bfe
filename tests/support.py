"""Helpers the end-to-end tests share: the CLI as a subprocess, free ports, waiting for servers,
and a process group that is always stopped (never `ray stop`)."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "jobs" / "tvkd.py"
# Variables that tie a process to this test session's cluster, fault file or tracking store.
SESSION_ONLY = ("RAY_ADDRESS", "TVKD_FAULT_FILE", "TVKD_FAULT", "MLFLOW_TRACKING_URI")


def clean_env(**extra: str) -> dict:
    """The environment for a process that must start its own cluster and store."""
    env = {k: v for k, v in os.environ.items() if k not in SESSION_ONLY}
    return {**env, **extra}


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python jobs/tvkd.py ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, str(CLI), *args],
        env=clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_cases(
    cases: list[list[str]], timeout: float = 900
) -> list[subprocess.CompletedProcess]:
    """``python jobs/tvkd.py ARGS`` for each of ``cases``, all in one process
    (tests/cli_cases.py): each case's exit status, stdout and stderr as a shell would see them."""
    with tempfile.TemporaryDirectory() as tmp:
        cases_file, out_file = Path(tmp) / "cases.json", Path(tmp) / "out.json"
        cases_file.write_text(json.dumps(cases))
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "cli_cases.py"), str(cases_file), str(out_file)],
            env=clean_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(out_file.read_text())
    return [
        subprocess.CompletedProcess(r["argv"], r["returncode"], r["stdout"], r["stderr"])
        for r in results
    ]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 300) -> None:
    """Poll until ``url`` answers; a server starting on a loaded 2-core machine can take minutes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s")


@contextmanager
def process_group(args: list[str], env: dict, log: Path | None = None):
    """Run ``args`` in a new process group; SIGTERM, then SIGKILL, the whole group on exit."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
    finally:
        if log:
            out.close()
    try:
        yield proc
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@contextmanager
def mlflow_server(store: Path, log: Path | None = None):
    """An MLflow tracking server on 127.0.0.1 over a sqlite store; yields its base URL."""
    port = free_port()
    args = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        # Its default, ./mlartifacts, would land in the directory the tests run from.
        "--artifacts-destination",
        str(store.parent / "mlartifacts"),
    ]
    with process_group(args, clean_env(), log) as proc:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health")
        yield base, proc
