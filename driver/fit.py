"""The Python API: ``tvkd_ray.fit(config, train_dataset=None, eval_dataset=None)``.

Order of work, cheapest checks first: config validation, the MLflow store, the tokenizers, every
data row (read and validated on the driver); then Ray and the cluster's resources, the student's
initial weights, the teacher/reference actor pools and the Ray Train run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tvkd_ray.config import TVKDConfig

# The package face tvkd_ray/__init__.py hands ``fit`` on from here, so this module imports only
# the standard library when loaded: the core, the rest of the driver and Ray load when fit()
# runs. Importing any core module then stays light, and no import order can meet a half-loaded
# module.

logger = logging.getLogger(__name__)
RESULT_FILE = "result.json"  # written when a run has finished


@dataclass
class FitResult:
    """What a run produced."""

    metrics: dict[str, float]
    model_dir: str
    checkpoint_dir: str | None
    run_dir: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    data_report: dict[str, Any] = field(default_factory=dict)
    already_finished: bool = False  # this call found the run finished and trained nothing


def finished_run(cfg: TVKDConfig) -> FitResult | None:
    """The result of this run directory's finished run, if it has one (and no overwrite)."""
    path = cfg.run_dir / RESULT_FILE
    if cfg.run.overwrite or not path.exists():
        return None
    result = FitResult(**json.loads(path.read_text()))
    result.already_finished = True
    logger.warning(
        "run %r already finished in %s (model %s); nothing to do: start a fresh run with "
        "another run.name, or run.overwrite=true to train this one again",
        cfg.run.name,
        cfg.run_dir,
        result.model_dir,
    )
    return result


def as_config(config: TVKDConfig | dict | str | os.PathLike) -> TVKDConfig:
    """A validated config from a TVKDConfig, a nested dict or a YAML path."""
    from tvkd_ray.config import TVKDConfig, config_from_dict, load_config

    if isinstance(config, TVKDConfig):
        config.validate()
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def ensure_ray(cfg: TVKDConfig) -> bool:
    """Attach to a running Ray, or start a local one; return True when this call started it."""
    import ray

    from driver.pools import resource_demand
    from tvkd_ray import runtime

    if ray.is_initialized():
        return False
    runtime.set_defaults(runtime.RAY_ENV)
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` (or an explicit address): attach; the job's runtime env rules.
        ray.init()
        return True
    if not runtime.verbose():
        # Ray turns token authentication on for a new local cluster (unless RAY_AUTH_MODE says
        # otherwise) and says so at every start; the header tells where the run goes instead.
        logging.getLogger(AUTH_NOTICE_LOGGER).addFilter(_drop_auth_notice)
    # Logical CPUs are over-committed on purpose: the pools' processes share the cores, and an
    # exact count would leave an actor pool waiting on a small machine (SPEC §9). Twice the
    # demand lets the eval stream start while the train stream's pools are still winding down.
    needed = sum(d["CPU"] for d in resource_demand(cfg).values())
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 2 * math.ceil(needed) + 1),
        include_dashboard=False,
        runtime_env={"env_vars": runtime.cluster_env_vars()},
        logging_level=logging.INFO if runtime.verbose() else logging.WARNING,
    )
    return True


def fit(config, train_dataset=None, eval_dataset=None) -> FitResult:
    """Train a student with TVKD (or DPO / SFT, by ``run.stage``) and return what it produced.

    ``config`` is a :class:`TVKDConfig`, a nested dict or a YAML path. ``train_dataset`` and
    ``eval_dataset`` may be ``ray.data.Dataset`` s of preference rows (any SPEC §4 format); they
    replace ``data.train_path`` / ``data.eval_path``. Ray is started only when not already
    running, and then shut down at the end.
    """
    from tvkd_ray import runtime

    cfg = as_config(config)
    finished = finished_run(cfg)
    if finished is not None:
        return finished
    # Before the libraries load: they read these once, at import.
    runtime.set_defaults(runtime.QUIET_ENV)
    runtime.set_defaults(runtime.MLFLOW_CLIENT_ENV)  # the driver opens and closes the run too
    import ray

    from driver import inputs
    from driver.console import WorkerLogFilter
    from driver.pools import check_resources
    from tvkd_ray import tracking

    # Cheap checks first: tracking store, tokenizers, every data row; then Ray and the models.
    uri = tracking.tracking_uri(cfg) if cfg.tracking.enabled else None
    if uri:
        tracking.check_reachable(uri)
    tokenizers = inputs.check_tokenizers(cfg)
    inputs.check_student(cfg)
    data = inputs.load_data(cfg, tokenizers, train_dataset, eval_dataset)
    if cfg.run.overwrite:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    started = ensure_ray(cfg)
    log_filter = None if runtime.verbose() else WorkerLogFilter().install()
    try:
        check_resources(cfg)
        return _train(cfg, data, tokenizers, uri)
    finally:
        if log_filter is not None:
            log_filter.remove()
        if started:
            ray.shutdown()


def _train(cfg: TVKDConfig, data, tokenizers, uri: str | None) -> FitResult:
    """The run on a cluster that holds it: models, pools and their streams, the Ray Train run,
    its MLflow run; its console for as long as it runs."""
    from driver import inputs, launch
    from driver.console import Console, header
    from driver.streams import build_streams, seal_caches
    from tvkd_ray import tracking

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    paths = inputs.prepare_models(cfg, tokenizers)
    console = Console()
    try:
        num_eval = 0 if data.eval is None else data.eval.num_rows
        for line in header(cfg, data.train.num_rows, num_eval, paths.cross_tokenizer):
            console.print(line)
        console.start()
        streams = build_streams(cfg, paths, data, console.board)
        params = {f"data.{k}": v for k, v in streams.data_report.items()}
        tags = {tracking.TOKENIZER_MAPPING_TAG: "char_offsets"} if paths.cross_tokenizer else {}
        run_id = tracking.open_run(cfg, params, tags)
        try:
            spec = launch.trainer_spec(cfg, paths, streams, uri, run_id, console.board)
            result = launch.run_trainers(cfg, spec, streams)
            tracking.close_run(
                cfg,
                uri,
                run_id,
                model_dir=spec.model_dir,
                step=int((result.metrics or {}).get("step", 0)),
                train=data.train,
                eval=data.eval,
                data_report=data.report,
                decode=tokenizers.student.decode,
            )
        except BaseException as exc:
            # A stopped run is KILLED (rerun to resume), anything else FAILED.
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracking.RunLogger(uri, run_id).set_status(status)
            raise
    finally:
        console.close()
    seal_caches(streams)
    outcome = FitResult(
        metrics=dict(result.metrics or {}),
        model_dir=spec.model_dir,
        checkpoint_dir=result.checkpoint.path if result.checkpoint is not None else None,
        run_dir=str(cfg.run_dir),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        data_report=streams.data_report,
    )
    (cfg.run_dir / RESULT_FILE).write_text(json.dumps(asdict(outcome), indent=1))
    return outcome
