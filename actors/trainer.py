"""The student train loop run by each Ray Train worker (``TorchTrainer``, Train V2 API).

Each worker streams its shard of the scored pairs (teacher potentials and reference log-probs
already attached), runs the library's :class:`~tvkd_ray.step.StudentStep` on each micro-batch in
step with the other workers (``actors.lockstep``), updates with AdamW, evaluates, checkpoints
(``actors.checkpoint``) and reports (``actors.reporting``; rank 0 logs to MLflow).
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.checkpoint import TrainState, load_checkpoint, save_checkpoint, save_hf_model
from actors.faults import maybe_crash
from actors.lockstep import Collective, Lockstep, ReplayedShard, ShardReader
from actors.parallel import strategy_for
from actors.progress import report
from actors.reporting import MetricWindow, eval_means, progress_line
from tvkd_ray import figures, runtime, schema
from tvkd_ray.config import config_from_dict
from tvkd_ray.errors import CheckpointError
from tvkd_ray.forward import ResponseLogps, autocast_dtype
from tvkd_ray.models import load_student, load_tokenizer
from tvkd_ray.step import Objective, StudentStep, apply_gradients
from tvkd_ray.tracking import RunLogger


@dataclass(frozen=True)
class TrainerSpec:
    """What every worker of one run is given (``train_loop_config={"spec": ...}``)."""

    config: dict  # the resolved TVKDConfig as a dict
    student_path: str  # the student's initial weights and tokenizer
    total_steps: int
    num_train_pairs: int
    has_eval: bool
    run_dir: str
    model_dir: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    torch_threads: int
    progress_board: Any = None  # actors.progress.ProgressBoard: the driver prints the steps


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point."""
    StudentTrainer(loop_config["spec"]).run()


class LearningRate:
    """Linear warm-up, then cosine decay towards 0, over the run's progress: the share of its
    pairs trained (or of ``train.max_steps``, whichever ends it first), so the schedule ends with
    the last step that actually runs, however unevenly the shards split."""

    def __init__(self, peak: float, warmup_ratio: float):
        self.peak, self.warmup = peak, warmup_ratio

    def factor(self, start: float, end: float) -> float:
        """Of a step taking progress from ``start`` to ``end`` (both in [0, 1])."""
        if start < self.warmup:
            return min(1.0, end / self.warmup)
        decayed = (start - self.warmup) / (1.0 - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, decayed)))

    def apply(self, optimizer, start: float, end: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.peak * self.factor(start, end)


class StudentTrainer:
    """One worker's whole run: set-up and resume, epochs of optimiser steps, evaluation,
    checkpoints and reports, and the final model."""

    def __init__(self, spec: TrainerSpec):
        import ray.train
        import ray.train.torch

        self.spec = spec
        self.cfg = cfg = config_from_dict(spec.config)
        self.collective = Collective()
        torch.manual_seed(cfg.run.seed)
        random.seed(cfg.run.seed)
        torch.set_num_threads(spec.torch_threads)
        runtime.set_defaults(runtime.MLFLOW_CLIENT_ENV)
        device = ray.train.torch.get_device()
        self.model = load_student(
            spec.student_path,
            cfg.student,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )
        self.model.to(device).train()
        self.tokenizer = load_tokenizer(spec.student_path)
        self.strategy = strategy_for(cfg.train.strategy, self.collective.world, device)
        self.policy = self.strategy.wrap(ResponseLogps(self.model))
        # After wrapping: FSDP replaces the parameters by their shards. (LoRA: adapters only.)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.learning_rate = LearningRate(cfg.train.lr, cfg.train.warmup_ratio)
        self.step_fn = StudentStep(
            Objective.from_config(cfg),
            self.policy,
            self.tokenizer.pad_token_id,
            device,
            autocast_dtype(cfg.student.autocast, device.type),
        )
        self.state, self.consumed, resumed = self._restore()
        self.logger = RunLogger(
            spec.tracking_uri if self.collective.rank == 0 else None, self.state.mlflow_run_id
        )
        if resumed and self.collective.rank == 0:
            self.logger.set_tag("tvkd.resumed_from_step", str(self.state.step))
            self.logger.set_status("RUNNING")
        self.eval_shard = (
            ReplayedShard(ray.train.get_dataset_shard(schema.EVAL_DATASET))
            if spec.has_eval
            else None
        )
        self.lockstep: Lockstep | None = None  # the current epoch's
        self.last_metrics: dict[str, float] = {}

    def _restore(self) -> tuple[TrainState, np.ndarray, bool]:
        """(state, pair ids consumed this epoch, resumed): the checkpoint's when Ray Train
        resumes this run, else fresh ones."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            fresh = TrainState(mlflow_run_id=self.spec.mlflow_run_id)
            return fresh, np.zeros(0, dtype=np.int64), False
        with checkpoint.as_directory() as ckpt_dir:
            restored = load_checkpoint(Path(ckpt_dir), checkpoint.path)
        try:
            self.strategy.load_state_dicts(
                self.model, self.optimizer, restored.weights, restored.optimizer_state
            )
        except CheckpointError as err:
            raise CheckpointError(f"{checkpoint.path}: {err}") from None
        state = restored.state
        state.mlflow_run_id = state.mlflow_run_id or self.spec.mlflow_run_id
        return state, restored.consumed, True

    @property
    def done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and self.state.step >= max_steps

    def run(self) -> None:
        train = self.cfg.train
        if self.state.step == 0 and self.eval_shard is not None and train.eval_on_start:
            # Step-0 eval: where the student starts, so every curve has its baseline.
            self._log(self.evaluate(), log_progress=False)
        while self.state.epoch < train.epochs and not self.done:
            self.train_epoch()
        self.finish()

    def train_epoch(self) -> None:
        """Optimiser steps until every worker's shard is empty (or max_steps), then the epoch's
        exactly-once audit: the pair ids trained, and the pairs dropped as non-finite."""
        import ray.train

        cfg = self.cfg
        # Each epoch is its own dataset, in its own seeded order (driver.streams).
        shard = ray.train.get_dataset_shard(schema.train_dataset(self.state.epoch))
        reader = ShardReader(shard, cfg.train.batch_size, cfg.data.on_invalid, self.consumed)
        self.lockstep = Lockstep(self.collective, reader, self._placeholder(), self.consumed)
        window = MetricWindow()
        while not self.done and not self.lockstep.exhausted:
            step = self.optimizer_step()
            if step is None:
                break
            window.add(*step)
            if self._report_due():
                # A new window from here: eval, logging and checkpoints count in the next one.
                finished, window = window, MetricWindow()
                self._report_window(finished)
        ids = self.lockstep.trained_ids()
        nonfinite = self.collective.sum([float(reader.nonfinite)])[0]
        if self.collective.rank == 0:
            seen_dir = Path(self.spec.run_dir) / "pairs_seen"
            seen_dir.mkdir(parents=True, exist_ok=True)
            np.save(seen_dir / f"epoch{self.state.epoch}.npy", ids)
            audit = {"data/pairs_trained_epoch": float(len(ids))}
            audit["data/skipped_nonfinite_epoch"] = nonfinite
            self.logger.log_metrics(audit, self.state.step)
        if not self.done:
            self.state.epoch += 1
            self.consumed = np.zeros(0, dtype=np.int64)
            self.lockstep = None  # nothing of the new epoch is trained yet

    def _placeholder(self) -> pa.Table:
        """The pair a worker without data runs (weight 0), with every column a batch has."""
        cfg, objective = self.cfg, self.step_fn.objective
        top_k = objective.top_k
        columns = schema.scored(
            teacher=cfg.uses_teacher,
            topk=top_k > 0,
            release=objective.kind == "release",
            reference=cfg.uses_reference,
        )
        return schema.placeholder(columns, self.tokenizer.pad_token_id, top_k)

    def progress(self) -> float:
        """Share of the run done: of its pairs trained, or of max_steps if that ends it first."""
        per_epoch = self.spec.num_train_pairs
        epoch_pairs = self.lockstep.epoch_pairs if self.lockstep else len(self.consumed)
        trained = self.state.epoch * per_epoch + epoch_pairs
        by_pairs = trained / max(per_epoch * self.cfg.train.epochs, 1)
        max_steps = self.cfg.train.max_steps
        by_steps = self.state.step / max_steps if max_steps else 0.0
        return min(1.0, max(by_pairs, by_steps))

    def optimizer_step(self) -> tuple[dict[str, float], float] | None:
        """One update on the step's ``grad_accum`` micro-batches (fewer at the end of an
        epoch): its metric sums and gradient norm, or None when no worker had a pair left."""
        start, progress = time.perf_counter(), self.progress()
        batches = self.lockstep.next_step(self.cfg.train.grad_accum)
        if not batches:
            return None
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {"wait_s": 0.0}
        for i, batch in enumerate(batches):
            with self.strategy.gradient_sync(self.policy, enabled=i == len(batches) - 1):
                loss, batch_sums = self.step_fn(batch.table)
                (loss * batch.weight).backward()
            if not batch.placeholder:
                sums["wait_s"] += batch.waited_s
                for k, v in batch_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
        self.state.step += 1
        self.learning_rate.apply(self.optimizer, progress, self.progress())
        grad_norm = apply_gradients(self.model, self.optimizer, self.cfg.train.max_grad_norm)
        maybe_crash("trainer", self.state.step)
        sums["step_s"] = time.perf_counter() - start
        return sums, grad_norm

    def _every(self, interval: int) -> bool:
        return interval > 0 and self.state.step % interval == 0

    def _report_due(self) -> bool:
        train = self.cfg.train
        saves_or_evals = self._every(train.save_every) or self._every(train.eval_every)
        return self._every(train.log_every) or saves_or_evals or self.done

    def _report_window(self, window: MetricWindow) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = window.metrics(self.collective, lr, self.state.num_tokens)
        self.state.num_tokens = int(metrics["num_tokens"])
        epoch_pairs = self.lockstep.epoch_pairs
        metrics["epoch"] = self.state.epoch + epoch_pairs / max(self.spec.num_train_pairs, 1)
        if self._every(self.cfg.train.eval_every):
            metrics.update(self.evaluate())
        self.last_metrics.update(metrics)
        self._log(metrics)
        if self._every(self.cfg.train.save_every):
            self.save(metrics)

    def _log(self, metrics: dict[str, float], log_progress: bool = True) -> None:
        """Rank 0 logs to MLflow (and prints the progress line)."""
        if self.collective.rank != 0:
            return
        self.logger.log_metrics(metrics, self.state.step)
        if log_progress:
            # The driver prints it: one line per report, with the rate and ETA, no worker prefix.
            step, total = self.state.step, self.spec.total_steps
            report(self.spec.progress_board, "set", "train", step, total, progress_line(metrics))

    def save(self, metrics: dict[str, float]) -> None:
        """Every worker reports to Ray Train; rank 0 attaches the checkpoint.

        Only checkpoints go through ``ray.train.report``: Train V2's controller drains reports
        every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so a report every step would
        cap training at one step per interval.
        """
        import ray.train

        ids = self.lockstep.trained_ids() if self.lockstep else self.consumed
        rank0 = self.collective.rank == 0
        if rank0 or self.strategy.gathers:
            weights, optimizer_state = self.strategy.state_dicts(self.model, self.optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank0:
                save_checkpoint(Path(tmp), weights, optimizer_state, self.state, ids)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)

    def evaluate(self, keep_pairs: int = 0) -> dict[str, float]:
        """Pair-weighted ``eval/`` metrics over every worker's eval shard (none without one):
        read in lockstep, so that any number of workers works with any eval set, even one
        smaller than a block per worker; ``eval/num_pairs`` counts the pairs scored. The first
        ``keep_pairs`` scored pairs of this worker are written for the driver's shaping picture
        (``tvkd_ray.figures``): the trainers hold the teacher's scores, the driver does not."""
        if self.eval_shard is None:
            return {}
        cfg = self.cfg
        reader = ShardReader(self.eval_shard, cfg.train.batch_size, cfg.data.on_invalid)
        lockstep = Lockstep(self.collective, reader, self._placeholder())
        totals: dict[str, float] = {}
        kept: list[pa.Table] = []
        self.model.eval()
        with torch.no_grad():
            while batches := lockstep.next_step(1):
                sums = self.step_fn(batches[0].table)[1]
                if not batches[0].placeholder:
                    for k, v in sums.items():
                        totals[k] = totals.get(k, 0.0) + v
                    if sum(t.num_rows for t in kept) < keep_pairs:
                        kept.append(batches[0].table)
        self.model.train()
        if kept:
            figures.write_pairs(kept, self.spec.run_dir, self.collective.rank)
        return {
            **eval_means(self.collective, totals),
            "eval/num_pairs": float(lockstep.epoch_pairs),
        }

    def finish(self) -> None:
        """Final eval, the Hugging Face model, a last checkpoint; the MLflow run is FINISHED."""
        keep = figures.NUM_PAIRS if self.cfg.uses_teacher else 0
        final = {**self.last_metrics, **self.evaluate(keep), "step": float(self.state.step)}
        model_dir = self.spec.model_dir
        weights = self.strategy.full_weights(self.model) if self.strategy.gathers else None
        if self.collective.rank == 0:
            save_hf_model(self.model, self.tokenizer, Path(model_dir), weights)
        self.save(final)  # the train metrics were logged when reported
        if self.collective.rank == 0:
            evals = {k: v for k, v in final.items() if k.startswith("eval/")}
            self.logger.log_metrics(evals, self.state.step)
            self.logger.set_tag("tvkd.model_dir", model_dir)
            self.logger.finish()
