"""Launching the student workers: the step plan, the exactly-once data split, the
``TorchTrainer`` with the run's scaling, failure and checkpoint settings, and a user error raised
inside a worker turned back into its one-line form."""

from __future__ import annotations

import math

import ray.train
from ray.train.torch import TorchTrainer

from actors.trainer import TrainerSpec, train_loop_per_worker
from driver import pools
from driver.inputs import ModelPaths
from driver.streams import Streams
from tvkd_ray import errors, runtime, schema
from tvkd_ray.config import TVKDConfig


class ExactlyOnceDataConfig(ray.train.DataConfig):
    """Split each dataset across the train workers without equalising the shards: Ray Train's
    default (``equal=True``) drops up to ``num_workers - 1`` rows per epoch, and every pair must
    be trained exactly once. The train loop copes with uneven shards (``actors.lockstep``)."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        splits = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            # Same order every run, so a resumed run and an uninterrupted one see equal batches.
            ds.context.execution_options.preserve_order = True
            parts = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, part in enumerate(parts):
                splits[rank][name] = part
        return splits


def total_steps(cfg: TVKDConfig, streams: Streams) -> int:
    """Optimiser steps of the whole run as the progress line shows them, an upper bound: shards
    are uneven by up to one block per worker (none is dropped). The learning rate follows the
    pairs trained instead (actors.trainer.LearningRate), so it needs no step count."""
    workers = cfg.train.num_workers
    largest_shard = math.ceil(streams.num_train_pairs / workers)
    if workers > 1:
        largest_shard += streams.rows_per_block
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps = max(1, math.ceil(largest_shard / per_step)) * cfg.train.epochs
    return steps if cfg.train.max_steps is None else min(steps, cfg.train.max_steps)


def trainer_spec(
    cfg: TVKDConfig, paths: ModelPaths, streams: Streams, uri, run_id, board=None
) -> TrainerSpec:
    return TrainerSpec(
        config=cfg.to_dict(),
        student_path=paths.student_init,
        total_steps=total_steps(cfg, streams),
        num_train_pairs=streams.num_train_pairs,
        has_eval=streams.eval is not None,
        run_dir=str(cfg.run_dir),
        model_dir=str(cfg.run_dir / "model"),
        mlflow_run_id=run_id,
        tracking_uri=uri,
        torch_threads=max(1, int(cfg.train.num_cpus_per_worker)),
        progress_board=board,
    )


def run_trainers(cfg: TVKDConfig, spec: TrainerSpec, streams: Streams) -> ray.train.Result:
    """Run the Ray Train workers to the end; a user error raised in one comes back as itself."""
    datasets = {schema.train_dataset(epoch): ds for epoch, ds in enumerate(streams.train)}
    if streams.eval is not None:
        datasets[schema.EVAL_DATASET] = streams.eval
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=pools.worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(cfg.run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Its controller's INFO lines (resource requests, worker group start) are its own.
            logging_config=ray.train.LoggingConfig(
                log_level="INFO" if runtime.verbose() else "WARNING"
            ),
        ),
        datasets=datasets,
        dataset_config=ExactlyOnceDataConfig(),
    )
    try:
        return trainer.fit()
    except Exception as exc:
        user_error = user_error_in(exc)
        if user_error is not None:
            raise user_error from None
        raise


def user_error_in(exc: BaseException) -> errors.TVKDError | None:
    """A TVKDError raised inside a worker reaches the driver wrapped; find it for a clean line."""
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, errors.TVKDError):
            return current
        stack += [current.__cause__, current.__context__]
        stack += list(getattr(current, "worker_failures", {}).values() or [])
        stack += [getattr(current, "cause", None)]
    text = str(exc)
    for name in ("CheckpointError", "DataError", "ModelError", "ResourceError", "ConfigError"):
        marker = f"{name}: "
        if marker in text:
            line = text.split(marker, 1)[1].splitlines()[0]
            return getattr(errors, name)(line)
    return None
