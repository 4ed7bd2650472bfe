"""The Python API: ``tvkd_ray.fit(config, train_dataset=None, eval_dataset=None)``.

Order of work, cheapest checks first: config validation, the MLflow store, the tokenizers, every
data row (read and validated on the driver); then Ray and the cluster's resources, the student's
initial weights, the teacher/reference actor pools and the Ray Train run.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from tvkd_ray.config import TVKDConfig, config_from_dict, load_config
from tvkd_ray.errors import TVKDError

logger = logging.getLogger(__name__)

# glibc settings for the CPU processes (the actor pools override them, tvkd_ray.pipeline): large
# blocks come from the heap and stay there for the next step. Otherwise every LM-head buffer is a
# fresh mmap, zero-filled page by page: ~30 % of a CPU training step (docs/BENCHMARKS.md).
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(512 * 2**20)}
# The teacher and reference actors (and the memory probes, which measure what they hold) return
# blocks of 1 MiB or more to the OS on free: in a heap, their chunk-sized LM-head buffers fragment
# it and RSS creeps towards the full logits (901 MiB peak for chunked potentials of 8,192
# positions x 49,152, against 221 MiB). The page faults this costs them are off the critical path
# while they keep ahead of the trainers (on 2 cores they only just do: docs/BENCHMARKS.md).
ACTOR_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_MMAP_MAX_": "65536"}
# Environment of every process in a cluster that fit() starts itself.
RAY_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    **ALLOCATOR_ENV,
}


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


def _as_config(config: TVKDConfig | dict | str | os.PathLike) -> TVKDConfig:
    if isinstance(config, TVKDConfig):
        config.validate()
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def _ensure_ray(cfg: TVKDConfig) -> bool:
    """Attach to a running Ray, or start a local one; return True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    passed = ("HF_HUB_OFFLINE", "TVKD_CACHE_DIR", "TVKD_FAULT", "TVKD_FAULT_FILE")
    env = {k: os.environ[k] for k in passed if k in os.environ}
    runtime_env = {"env_vars": {**RAY_ENV, **env}}
    if os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` (or an explicit address): attach; the job's runtime env rules.
        ray.init()
        return True
    from tvkd_ray.pipeline import resource_demand

    # Logical CPUs are over-committed on purpose: the pools' processes share the cores, and an
    # exact count would leave an actor pool waiting on a small machine (SPEC §9). Twice the
    # demand lets the eval stream start while the train stream's pools are still winding down.
    needed = sum(d["CPU"] for d in resource_demand(cfg).values())
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, 2 * math.ceil(needed) + 1),
        include_dashboard=False,
        runtime_env=runtime_env,
    )
    return True


def fit(config, train_dataset=None, eval_dataset=None) -> FitResult:
    """Train a student with TVKD (or DPO / SFT, by ``run.stage``) and return what it produced.

    ``config`` is a :class:`TVKDConfig`, a nested dict or a YAML path. ``train_dataset`` and
    ``eval_dataset`` may be ``ray.data.Dataset`` s of preference rows (any SPEC §4 format); they
    replace ``data.train_path`` / ``data.eval_path``. Ray is started only when not already
    running, and then shut down at the end.
    """
    cfg = _as_config(config)
    from tvkd_ray import pipeline, tracking

    # Cheap checks first: tracking store, tokenizers, every data row; then Ray and the models.
    uri = tracking.tracking_uri(cfg) if cfg.tracking.enabled else None
    if uri:
        tracking.check_reachable(uri)
    tokenizer = pipeline.check_tokenizers(cfg)
    data = pipeline.load_data(cfg, tokenizer, train_dataset, eval_dataset)
    started = _ensure_ray(cfg)
    try:
        pipeline.check_resources(cfg)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        paths = pipeline.prepare_models(cfg)
        streams = pipeline.build_streams(cfg, paths, data)
        run_id = tracking.open_run(cfg, {f"data.{k}": v for k, v in streams.data_report.items()})
        try:
            return _train(cfg, paths, streams, uri, run_id)
        except BaseException as exc:
            # A stopped run is KILLED (rerun to resume), anything else FAILED.
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracking.RunLogger(uri, run_id).set_status(status)
            raise
    finally:
        if started:
            import ray

            ray.shutdown()


def _train(cfg: TVKDConfig, paths, streams, uri: str | None, run_id: str | None) -> FitResult:
    import ray.train
    from ray.train.torch import TorchTrainer

    from actors.trainer import train_loop_per_worker
    from tvkd_ray.pipeline import ExactlyOnceDataConfig

    # Shards are uneven by up to one block per worker (none is dropped): plan for the largest.
    workers = cfg.train.num_workers
    largest_shard = math.ceil(streams.num_train_pairs / workers)
    if workers > 1:
        largest_shard += streams.rows_per_block
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps_per_epoch = max(1, math.ceil(largest_shard / per_step))
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    model_dir = cfg.run_dir / "model"
    datasets = {"train": streams.train}
    if streams.eval is not None:
        datasets["eval"] = streams.eval
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "student_path": paths.student_init,
            "total_steps": total_steps,
            "num_train_pairs": streams.num_train_pairs,
            "has_eval": streams.eval is not None,
            "run_dir": str(cfg.run_dir),
            "model_dir": str(model_dir),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "torch_threads": max(1, int(cfg.train.num_cpus_per_worker)),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.num_cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(cfg.run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ExactlyOnceDataConfig(),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        user_error = _user_error_in(exc)
        if user_error is not None:
            raise user_error from None
        raise
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return FitResult(
        metrics=dict(result.metrics or {}),
        model_dir=str(model_dir),
        checkpoint_dir=checkpoint,
        run_dir=str(cfg.run_dir),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        data_report=streams.data_report,
    )


def _user_error_in(exc: BaseException) -> TVKDError | None:
    """A TVKDError raised inside a worker reaches the driver wrapped; find it for a clean line."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TVKDError):
            return current
        stack += [current.__cause__, current.__context__]
        stack += list(getattr(current, "worker_failures", {}).values() or [])
        stack += [getattr(current, "cause", None)]
    text = str(exc)
    for name in ("CheckpointError", "DataError", "ModelError", "ResourceError", "ConfigError"):
        marker = f"{name}: "
        if marker in text:
            from tvkd_ray import errors

            line = text.split(marker, 1)[1].splitlines()[0]
            return getattr(errors, name)(line)
    return None
