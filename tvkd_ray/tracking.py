"""MLflow tracking: the driver opens (or reopens) the run, rank 0 logs to it.

The driver checks the store before any model work, creates the run and logs the flattened params
and the resolved config; the run id is written to ``<run_dir>/mlflow_run_id`` and saved in every
checkpoint, so a resumed run continues the same MLflow run. Logging failures during training warn
and never stop training.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from typing import Any

from tvkd_ray.config import TVKDConfig
from tvkd_ray.errors import ConfigError

logger = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id"


def tracking_uri(config: TVKDConfig) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite in the output root."""
    if config.tracking.uri:
        return config.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{config.run_dir.parent / 'mlflow.db'}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"loss": {"alpha": 0.5}}`` -> ``{"loss.alpha": "0.5"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def check_reachable(uri: str) -> None:
    """Fail fast with one line when an http(s) tracking server does not answer."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5)
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise ConfigError(
            f"tracking.uri: MLflow server {uri} is unreachable ({reason}); start it, fix the "
            "URI, or set tracking.enabled=false"
        ) from None


def open_run(config: TVKDConfig, extra_params: dict[str, Any] | None = None) -> str | None:
    """Create the run, or reopen the one this run directory already has; return its id."""
    if not config.tracking.enabled:
        return None
    import mlflow

    uri = tracking_uri(config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    id_file = config.run_dir / RUN_ID_FILE
    # A client, not mlflow.set_tracking_uri: that would also export MLFLOW_TRACKING_URI to every
    # later subprocess of a pipeline that embeds fit().
    client = mlflow.MlflowClient(uri)
    if id_file.exists():
        run_id = id_file.read_text().strip()
        try:
            client.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            logger.warning("MLflow run %s of %s is gone; starting a new run", run_id, id_file)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        # Local stores keep artifacts beside the database, not in ./mlruns of the current
        # directory (a Ray job's working directory is a temporary copy); servers choose their own.
        local = urllib.parse.urlparse(uri).scheme in ("sqlite", "file", "")
        artifacts = (config.run_dir.parent / "mlartifacts").as_uri() if local else None
        experiment_id = client.create_experiment(
            config.tracking.experiment, artifact_location=artifacts
        )
    run = client.create_run(
        experiment_id,
        run_name=config.run.name,
        tags={"tvkd.run_dir": str(config.run_dir), "tvkd.stage": config.run.stage},
    )
    run_id = run.info.run_id
    params = flatten(config.to_dict())
    params.update({k: str(v) for k, v in (extra_params or {}).items()})
    items = list(params.items())
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        batch = [mlflow.entities.Param(k, v[:6000]) for k, v in items[start : start + 100]]
        client.log_batch(run_id, params=batch)
    client.log_text(run_id, config.to_yaml(), "config.yaml")
    id_file.write_text(run_id)
    return run_id


class RunLogger:
    """Logs metrics to one MLflow run from the rank-0 worker; failures only warn.

    After ``MAX_FAILURES`` failed calls in a row logging is switched off for the rest of the run,
    so an unreachable server costs a few timeouts (short ones in processes that apply
    ``runtime.MLFLOW_CLIENT_ENV``, as ``fit`` and the trainers do), not a stall at every step.
    """

    MAX_FAILURES = 3

    def __init__(self, uri: str | None, run_id: str | None):
        self.run_id = run_id
        self._client = None
        self._failures = 0
        if uri and run_id:
            try:
                import mlflow

                self._client = mlflow.MlflowClient(uri)
            except Exception as exc:  # tracking must never stop training
                logger.warning("MLflow unavailable, metrics will not be logged: %s", exc)

    def _safely(self, what: str, fn, *args, **kwargs) -> None:
        if self._client is None:
            return
        try:
            fn(*args, **kwargs)
            self._failures = 0
        except Exception as exc:  # tracking must never stop training
            self._failures += 1
            logger.warning("MLflow %s failed (training goes on): %s", what, exc)
            if self._failures >= self.MAX_FAILURES:
                logger.warning(
                    "MLflow failed %d times in a row: logging is off for this run", self._failures
                )
                self._client = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        import mlflow

        now = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._safely("log_metrics", self._client and self._client.log_batch, self.run_id, batch)

    def set_tag(self, key: str, value: str) -> None:
        self._safely("set_tag", self._client and self._client.set_tag, self.run_id, key, value)

    def log_dict(self, data: dict, name: str) -> None:
        self._safely("log_dict", self._client and self._client.log_dict, self.run_id, data, name)

    def set_status(self, status: str) -> None:
        """RUNNING again after a resume; FINISHED, FAILED or KILLED at the end."""
        self._safely("update_run", self._client and self._client.update_run, self.run_id, status)

    def finish(self) -> None:
        self.set_status("FINISHED")


def mlflow_ui_command(uri: str) -> str:
    """The exact command that shows this store in the MLflow UI, bound to 127.0.0.1."""
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
