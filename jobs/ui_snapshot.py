"""Screenshots of a finished run in the real MLflow UI, taken by headless Chromium.

    python jobs/ui_snapshot.py                        # trains a tiny run first (a few minutes)
    python jobs/ui_snapshot.py --run-dir DIR          # a finished run's directory instead

It starts ``mlflow server`` on 127.0.0.1 over the run's store, loads the run's overview and its
artifacts page, and writes ``docs/mlflow_run_page.png`` and ``docs/mlflow_run_artifacts.png``:
the check that what a user sees (names, groups, description, source, duration, the shaping
picture, the logged model) tells the run's story. `make ui-snapshot` installs Chromium first.
Not part of `make test`: it needs a browser and a few minutes.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

# Runs as a script from a checkout: make the packages importable.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tvkd_ray import tracking  # noqa: E402

# File -> (page of the run, window height): the overview is tall enough to reach its metrics and
# logged model; the artifacts page opens the shaping picture.
PAGES = {
    "mlflow_run_page.png": ("", 1900),
    "mlflow_run_artifacts.png": ("/artifacts/shaping_terms.png", 1000),
}
# MLflow 3.17's UI opens every experiment in its GenAI mode unless the URL (or the toggle, kept in
# the browser's local storage) asks for the other; the experiment's kind tag does not decide it.
MODE = "?workflowType=machine_learning"
# Enough metric curves and evaluations for the charts, still a tiny run.
TINY_RUN = ["--train.max_steps=6", "--train.eval_every=3", "--train.log_every=1"]


def train_tiny(out: Path) -> Path:
    """A tiny TVKD run with an eval set, through the CLI as a user runs it; its run directory."""
    cmd = [sys.executable, str(REPO / "jobs" / "tvkd.py"), "--config", "examples/tiny.yaml"]
    cmd += [f"--run.output_dir={out}", "--run.name=ui-snapshot", *TINY_RUN]
    subprocess.run(cmd, cwd=REPO, check=True)
    return out / "ui-snapshot"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(uri: str, log: Path):
    """``mlflow server`` bound to 127.0.0.1 over ``uri``; yields its base URL, stops its group."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    args = [str(mlflow), "server", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    args += ["--port", str(port), "--workers", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded 2-core machine takes a while to import mlflow
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"mlflow server did not start; see {log}") from None
                time.sleep(1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def screenshot(url: str, target: Path, wait_ms: int, height: int) -> None:
    """Chromium's own CLI screenshot: headless, sandbox-less (root), nothing but ``url`` loaded;
    the virtual time budget lets the JS app fetch and render the run before the shot."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: `make ui-snapshot` installs it (apt-get)")
    with tempfile.TemporaryDirectory() as profile:
        args = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--run-all-compositor-stages-before-draw",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={wait_ms}",
            f"--window-size=1400,{height}",
            f"--screenshot={target}",
            url,
        ]
        subprocess.run(args, check=True, capture_output=True, timeout=300)
    print(f"{target}  <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run's directory")
    parser.add_argument("--tracking-uri", help="its store (default: the run's own sqlite)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs")
    parser.add_argument("--wait-ms", type=int, default=10000, help="virtual time per page")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "tvkd-ui-snapshot"
    )
    args = parser.parse_args()
    # The tiny run stays in --work-dir: a rerun can take it with --run-dir instead of training.
    run_dir = args.run_dir or train_tiny(args.work_dir / f"out-{int(time.time())}")
    with tempfile.TemporaryDirectory(prefix="ui-snapshot-") as tmp:
        run_id = (run_dir / tracking.RUN_ID_FILE).read_text().strip()
        uri = args.tracking_uri or f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"
        import mlflow

        experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
        with mlflow_server(uri, Path(tmp) / "server.log") as base:
            for name, (page, height) in PAGES.items():
                url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}{page}{MODE}"
                screenshot(url, args.out_dir / name, args.wait_ms, height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
