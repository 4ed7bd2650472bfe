"""The student train loop run by each Ray Train worker (``TorchTrainer``, Train V2 API).

Each worker streams its shard of the pipeline's dataset (pairs already carrying teacher potentials
and reference log-probs), runs one forward over the 2B-row batch, computes the TVKD / DPO / SFT
loss and updates with AdamW. Shards may be uneven so that no pair is dropped: every micro-step the
workers agree on how many pairs they hold, a worker without data contributes a zero-weight step,
and each worker's loss is scaled so DDP's gradient average is the mean over all pairs of the step.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from actors.faults import maybe_crash
from tvkd_ray.config import TVKDConfig, config_from_dict
from tvkd_ray.data import collate
from tvkd_ray.errors import CheckpointError, DataError
from tvkd_ray.forward import ResponseLogps, row_sums
from tvkd_ray.loss import bc_loss, kd_loss, preference_metrics, tvkd_loss
from tvkd_ray.models import load_model, load_tokenizer
from tvkd_ray.tracking import RunLogger

STATE_FILE = "trainer_state.json"
# Metrics that are sums over the step (not means over pairs) when aggregated across workers.
_COUNTS = (
    "pairs",
    "tokens",
    "response_tokens",
    "payload_bytes",
    "wait_s",
    "teacher_s",
    "reference_s",
)
# What the teacher sends the trainers: potentials, top-k for KD, its timing column.
_TEACHER_COLUMNS = (
    "chosen_potentials",
    "rejected_potentials",
    "chosen_topk_ids",
    "chosen_topk_logps",
    "teacher_s",
)


class _Worker:
    """Rank, world size and the collective helpers of this worker."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        self.distributed = self.world > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()


def _lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _to_table(batch) -> pa.Table:
    return batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)


def _per_position(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values back at their ``[rows, positions]`` places (0 elsewhere)."""
    out = torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device)
    out[response_mask] = values
    return out


class StudentStep:
    """Loss of one collated batch for the configured stage, plus its summed metrics."""

    def __init__(self, config: TVKDConfig, policy: torch.nn.Module, pad_id: int, device):
        self.config = config
        self.policy = policy
        self.pad_id = pad_id
        self.device = device

    def __call__(self, table: pa.Table) -> tuple[torch.Tensor, dict[str, float], int]:
        """Return (mean loss over the batch's pairs, metric sums over its pairs, pair count)."""
        cfg = self.config
        batch = collate(table, self.pad_id)
        n_pairs = table.num_rows
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        response_mask = batch["response_mask"].to(self.device)
        topk_ids = None
        if cfg.loss.kd_weight > 0:
            k = cfg.teacher.top_k
            ids = np.concatenate(table.column("chosen_topk_ids").to_numpy(zero_copy_only=False))
            topk_ids = torch.from_numpy(ids.astype(np.int64).reshape(-1, k)).to(self.device)
        if cfg.run.stage == "sft":
            # Only chosen rows matter; the rejected half is still built by collate but skipped.
            rows = slice(0, n_pairs)
            input_ids, attention_mask = input_ids[rows], attention_mask[rows]
            response_mask = response_mask[rows]
        # fp32 weights everywhere; on GPU the forward runs under bf16 autocast.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logps, topk_logps = self.policy(input_ids, attention_mask, response_mask, topk_ids)
        seq_logps = row_sums(logps, response_mask)
        chosen_mask = response_mask[:n_pairs]
        tokens = int(attention_mask.sum())
        sums: dict[str, float] = {
            "pairs": n_pairs,
            "tokens": tokens,
            "response_tokens": int(response_mask.sum()),
        }
        if cfg.run.stage == "sft":
            loss = bc_loss(_per_position(logps, response_mask), chosen_mask)
            sums["loss"] = loss.item() * n_pairs
            sums["logps/chosen"] = seq_logps.detach().sum().item()
            return loss, sums, n_pairs

        potentials = batch.get("potentials")
        if potentials is not None:
            potentials = potentials.to(self.device)
            sums["payload_bytes"] = sum(
                table.column(c).nbytes for c in _TEACHER_COLUMNS if c in table.column_names
            )
        for timing in ("teacher_s", "reference_s"):
            if timing in table.column_names:
                sums[timing] = float(pc.sum(table.column(timing)).as_py())
        ref = batch["ref_logps"].to(self.device)
        out = tvkd_loss(
            seq_logps[:n_pairs],
            seq_logps[n_pairs:],
            ref[:n_pairs],
            ref[n_pairs:],
            None if potentials is None else potentials[:n_pairs],
            None if potentials is None else potentials[n_pairs:],
            chosen_mask,
            response_mask[n_pairs:],
            beta=cfg.loss.beta,
            alpha=cfg.alpha,
            gamma=cfg.loss.gamma,
            label_smoothing=cfg.loss.label_smoothing,
            center=cfg.loss.center_potentials,
        )
        loss = out.loss
        if cfg.loss.bc_weight > 0:
            per_token = _per_position(logps, response_mask)[:n_pairs]
            loss = loss + cfg.loss.bc_weight * bc_loss(per_token, chosen_mask)
        if topk_logps is not None:
            k = cfg.teacher.top_k
            teacher = np.concatenate(
                table.column("chosen_topk_logps").to_numpy(zero_copy_only=False)
            ).reshape(-1, k)
            loss = loss + cfg.loss.kd_weight * kd_loss(
                topk_logps, torch.from_numpy(teacher).to(self.device)
            )
        metrics = preference_metrics(
            out,
            seq_logps[:n_pairs],
            seq_logps[n_pairs:],
            None if potentials is None else potentials[:n_pairs],
            chosen_mask,
            None if potentials is None else potentials[n_pairs:],
            response_mask[n_pairs:],
        )
        metrics["loss"] = loss.item()
        sums.update({k: v * n_pairs for k, v in metrics.items()})
        return loss, sums, n_pairs


def placeholder_batch(cfg: TVKDConfig, pad_id: int) -> pa.Table:
    """One-token pair with every column the step reads, for a worker whose shard is empty but
    which must still join DDP's all-reduce (trained with weight 0)."""
    columns = {
        "pair_id": pa.array([-1], pa.int64()),
        "prompt_ids": pa.array([[pad_id]], pa.list_(pa.int32())),
        "chosen_ids": pa.array([[pad_id]], pa.list_(pa.int32())),
        "rejected_ids": pa.array([[pad_id]], pa.list_(pa.int32())),
    }
    if cfg.uses_teacher:
        columns["chosen_potentials"] = pa.array([[0.0]], pa.list_(pa.float32()))
        columns["rejected_potentials"] = pa.array([[0.0]], pa.list_(pa.float32()))
    if cfg.loss.kd_weight > 0:
        k = cfg.teacher.top_k
        columns["chosen_topk_ids"] = pa.array([[pad_id] * k], pa.list_(pa.int32()))
        columns["chosen_topk_logps"] = pa.array([[-1.0] * k], pa.list_(pa.float32()))
    if cfg.run.stage != "sft":
        columns["ref_chosen_logps"] = pa.array([0.0], pa.float32())
        columns["ref_rejected_logps"] = pa.array([0.0], pa.float32())
    return pa.table(columns)


def _save_checkpoint(directory: Path, model, optimizer, scheduler, state: dict, consumed):
    from safetensors.torch import save_model

    save_model(model, str(directory / "model.safetensors"))  # handles tied embeddings
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, directory / "rng.pt")
    np.save(directory / "consumed_pair_ids.npy", consumed)
    (directory / STATE_FILE).write_text(json.dumps(state))


def _load_checkpoint(
    directory: Path, model, optimizer, scheduler, origin: str
) -> tuple[dict, np.ndarray]:
    """Restore training state; a damaged file gives a CheckpointError naming it in ``origin``
    (the checkpoint's storage path; ``directory`` may be a local copy of it)."""
    from safetensors.torch import load_model as load_weights_into

    current = None
    try:
        current = directory / STATE_FILE
        state = json.loads(current.read_text())
        current = directory / "model.safetensors"
        load_weights_into(model, str(current))
        current = directory / "optimizer.pt"
        optimizer.load_state_dict(torch.load(current, weights_only=True))
        current = directory / "scheduler.pt"
        scheduler.load_state_dict(torch.load(current, weights_only=True))
        current = directory / "rng.pt"
        rng = torch.load(current, weights_only=True)
        current = directory / "consumed_pair_ids.npy"
        consumed = np.load(current, allow_pickle=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint file {Path(origin) / current.name} is corrupted or truncated ({reason}); "
            f"restore it, or start over by deleting {Path(origin).parent} or choosing a new "
            "run.name"
        ) from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return state, consumed


def drop_nonfinite(table: pa.Table, on_invalid: str) -> tuple[pa.Table, int]:
    """Pairs whose teacher potentials or reference log-probs are not finite are never trained on:
    they are named in a DataError (``on_invalid="error"``) or dropped and counted (``skip``)."""
    bad = np.zeros(table.num_rows, dtype=bool)
    for name in ("chosen_potentials", "rejected_potentials"):
        if name in table.column_names:
            values = table.column(name).combine_chunks()
            nonfinite = ~np.isfinite(pc.list_flatten(values).to_numpy(zero_copy_only=False))
            if nonfinite.any():
                rows = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
                bad[rows[nonfinite]] = True
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        if name in table.column_names:
            bad |= ~np.isfinite(table.column(name).to_numpy(zero_copy_only=False))
    if not bad.any():
        return table, 0
    if on_invalid == "error":
        ids = table.column("pair_id").to_numpy()[bad]
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise DataError(
            f"teacher potentials or reference log-probs are not finite for pair_id {shown}; "
            "check the teacher and reference models, or set data.on_invalid=skip to drop them"
        )
    return table.filter(pa.array(~bad)), int(bad.sum())


def _iterate(shard, batch_size: int, on_invalid: str, skipped: dict, skip_ids=None):
    """Yield (pa.Table batch, seconds waited for it), leaving out pairs trained before a resume
    and pairs with non-finite teacher/reference values (counted in ``skipped``)."""
    iterator = iter(
        shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=2)
    )
    while True:
        start = time.perf_counter()
        try:
            table = _to_table(next(iterator))
        except StopIteration:
            return
        waited = time.perf_counter() - start
        if skip_ids is not None and len(skip_ids):
            table = table.filter(pc.invert(pc.is_in(table["pair_id"], pa.array(skip_ids))))
        table, dropped = drop_nonfinite(table, on_invalid)
        skipped["nonfinite"] = skipped.get("nonfinite", 0) + dropped
        if table.num_rows:
            yield table, waited


def _evaluate(step_fn: StudentStep, worker: _Worker, shard, batch_size: int) -> dict[str, float]:
    """Pair-weighted eval metrics over every worker's eval shard."""
    totals: dict[str, float] = {}
    with torch.no_grad():
        for table, _ in _iterate(shard, batch_size, step_fn.config.data.on_invalid, {}):
            _, sums, _ = step_fn(table)
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + v
    keys = sorted(set(totals) | {"pairs"})
    # Every worker must all-reduce the same keys: agree on the union first.
    all_keys = sorted(set(keys) | set(_broadcast_keys(worker, keys)))
    summed = dict(zip(all_keys, worker.sum([totals.get(k, 0.0) for k in all_keys]), strict=True))
    pairs = max(summed.pop("pairs"), 1.0)
    for k in ("tokens", "response_tokens", "payload_bytes"):
        summed.pop(k, None)
    return {f"eval/{k}": v / pairs for k, v in summed.items()}


def _broadcast_keys(worker: _Worker, keys: list[str]) -> list[str]:
    if not worker.distributed:
        return keys
    gathered: list[list[str]] = [[] for _ in range(worker.world)]
    dist.all_gather_object(gathered, keys)
    return [k for ks in gathered for k in ks]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config`` holds the resolved config and pipeline facts."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    worker = _Worker()
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    if loop_config.get("torch_threads"):
        torch.set_num_threads(int(loop_config["torch_threads"]))
    device = ray.train.torch.get_device()
    model = load_model(loop_config["student_path"], dtype="float32").to(device)
    model.train()
    tokenizer = load_tokenizer(loop_config["student_path"])
    policy = ResponseLogps(model)
    policy = ray.train.torch.prepare_model(policy) if worker.world > 1 else policy.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(loop_config["total_steps"], cfg.train.warmup_ratio)
    )
    state: dict[str, Any] = {"step": 0, "epoch": 0, "num_tokens": 0}
    consumed = np.zeros(0, dtype=np.int64)  # pair ids already trained in the current epoch
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state, consumed = _load_checkpoint(
                Path(ckpt_dir), model, optimizer, scheduler, origin=checkpoint.path
            )
    run_id = state.get("mlflow_run_id") or loop_config.get("mlflow_run_id")
    logger = RunLogger(loop_config.get("tracking_uri") if worker.rank == 0 else None, run_id)
    if worker.rank == 0 and checkpoint is not None:
        logger.set_tag("tvkd.resumed_from_step", str(state["step"]))
        logger.set_status("RUNNING")

    step_fn = StudentStep(cfg, policy, tokenizer.pad_token_id, device)
    placeholder = placeholder_batch(cfg, tokenizer.pad_token_id)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if loop_config.get("has_eval") else None
    seen_dir = Path(loop_config["run_dir"]) / "pairs_seen"
    num_pairs = loop_config["num_train_pairs"]
    accum = cfg.train.grad_accum
    last_metrics: dict[str, float] = {}
    seen: list[np.ndarray] = []  # pair ids this worker trained in the current epoch

    def epoch_ids() -> np.ndarray:
        """Every pair id trained in this epoch so far, gathered from all workers."""
        mine = np.concatenate(seen) if seen else np.zeros(0, dtype=np.int64)
        parts = [mine]
        if worker.distributed:
            parts = [None] * worker.world
            dist.all_gather_object(parts, mine)
        return np.concatenate([consumed, *parts])

    def report(metrics: dict[str, float], save: bool, log: bool = True) -> None:
        """Rank 0 logs to MLflow; with ``save`` all workers report a checkpoint to Ray Train.

        Only checkpoints go through ``ray.train.report``: Train V2's controller drains reports
        every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), so a report every step would
        cap training at one step per interval.
        """
        if worker.rank == 0 and log:
            logger.log_metrics(metrics, state["step"])
            print(_progress_line(state["step"], loop_config["total_steps"], metrics), flush=True)
        if not save:
            return
        ids = epoch_ids()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if worker.rank == 0:
                _save_checkpoint(
                    Path(tmp), model, optimizer, scheduler, {**state, "mlflow_run_id": run_id}, ids
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def run_eval() -> dict[str, float]:
        if eval_shard is None:
            return {}
        model.eval()
        metrics = _evaluate(step_fn, worker, eval_shard, cfg.train.batch_size)
        model.train()
        return metrics

    if state["step"] == 0 and eval_shard is not None and cfg.train.eval_on_start:
        # Step-0 eval: where the student starts, so every curve has its baseline.
        initial = run_eval()
        if worker.rank == 0:
            logger.log_metrics(initial, 0)

    done = cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps
    while state["epoch"] < cfg.train.epochs and not done:
        skipped: dict[str, int] = {}
        batches = _iterate(
            train_shard, cfg.train.batch_size, cfg.data.on_invalid, skipped, skip_ids=consumed
        )
        window: dict[str, Any] = {"sums": {}, "start": time.perf_counter(), "steps": 0}
        exhausted = False
        epoch_pairs = len(consumed)  # global count, known to every worker
        while not exhausted and not done:
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_sums: dict[str, float] = {"wait_s": 0.0}
            micro = 0
            for _ in range(accum):
                item = next(batches, None)
                global_pairs = worker.sum([0.0 if item is None else item[0].num_rows])[0]
                if global_pairs == 0:
                    exhausted = True
                    break
                epoch_pairs += global_pairs
                # A worker whose shard ran dry steps on a placeholder with weight 0 so that
                # every worker joins DDP's gradient all-reduce.
                table, waited = item if item is not None else (placeholder, 0.0)
                loss, sums, n_pairs = step_fn(table)
                weight = 0.0 if item is None else n_pairs * worker.world / global_pairs
                (loss * weight / accum).backward()
                micro += 1
                if item is None:
                    continue
                seen.append(table.column("pair_id").to_numpy())
                step_sums["wait_s"] += waited
                for k, v in sums.items():
                    step_sums[k] = step_sums.get(k, 0.0) + v
            if micro == 0:
                break
            if micro < accum:  # a short last step: average over the micro-batches it had
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(accum / micro)
            grad_norm = 0.0
            if cfg.train.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                grad_norm = float(norm)
            optimizer.step()
            scheduler.step()
            state["step"] += 1
            maybe_crash("trainer", state["step"])
            step_sums["step_s"] = time.perf_counter() - step_start
            for k, v in step_sums.items():
                window["sums"][k] = window["sums"].get(k, 0.0) + v
            window["steps"] += 1
            window["grad_norm"] = grad_norm
            done = cfg.train.max_steps is not None and state["step"] >= cfg.train.max_steps
            save_now = cfg.train.save_every > 0 and state["step"] % cfg.train.save_every == 0
            eval_now = cfg.train.eval_every > 0 and state["step"] % cfg.train.eval_every == 0
            if state["step"] % cfg.train.log_every == 0 or save_now or eval_now or done:
                metrics = _window_metrics(worker, window, scheduler, state)
                metrics["epoch"] = state["epoch"] + epoch_pairs / max(num_pairs, 1)
                window = {"sums": {}, "start": time.perf_counter(), "steps": 0}
                if eval_now:
                    metrics.update(run_eval())
                last_metrics.update(metrics)
                report(metrics, save=save_now)
        ids = epoch_ids()
        nonfinite = worker.sum([float(skipped.get("nonfinite", 0))])[0]
        if worker.rank == 0:
            seen_dir.mkdir(parents=True, exist_ok=True)
            np.save(seen_dir / f"epoch{state['epoch']}.npy", ids)
            logger.log_metrics(
                {
                    "data/pairs_trained_epoch": float(len(ids)),
                    "data/skipped_nonfinite_epoch": nonfinite,
                },
                state["step"],
            )
        if not done:
            state["epoch"] += 1
            seen.clear()
            consumed = np.zeros(0, dtype=np.int64)

    final = dict(last_metrics)
    final.update(run_eval())
    final["step"] = float(state["step"])
    if worker.rank == 0:
        _save_hf_model(model, tokenizer, Path(loop_config["model_dir"]))
    report(final, save=True, log=False)  # the train metrics were logged when reported
    if worker.rank == 0:
        logger.log_metrics({k: v for k, v in final.items() if k.startswith("eval/")}, state["step"])
        logger.set_tag("tvkd.model_dir", loop_config["model_dir"])
        logger.finish()


def _window_metrics(worker: _Worker, window: dict, scheduler, state: dict) -> dict[str, float]:
    """Pair-weighted means across workers of everything summed since the last report."""
    sums = window["sums"]
    keys = sorted(set(sums) | set(_broadcast_keys(worker, sorted(sums))))
    total = dict(zip(keys, worker.sum([sums.get(k, 0.0) for k in keys]), strict=True))
    elapsed = time.perf_counter() - window["start"]
    pairs = max(total.get("pairs", 0.0), 1.0)
    steps = max(window["steps"], 1)
    state["num_tokens"] += int(total.get("tokens", 0.0))
    metrics = {k: v / pairs for k, v in total.items() if k not in _COUNTS and k != "step_s"}
    metrics.update(
        {
            "grad_norm": window.get("grad_norm", 0.0),
            "learning_rate": scheduler.get_last_lr()[0],
            "num_tokens": float(state["num_tokens"]),
            "perf/tokens_per_s": total.get("tokens", 0.0) / max(elapsed, 1e-9),
            "perf/pairs_per_s": total.get("pairs", 0.0) / max(elapsed, 1e-9),
            "timing_s/step": total.get("step_s", 0.0) / worker.world / steps,
            "timing_s/wait_teacher": total.get("wait_s", 0.0) / worker.world / steps,
        }
    )
    for pool in ("teacher", "reference"):
        if total.get(f"{pool}_s"):
            # Per actor: the tokens one actor scores per second of its own compute.
            metrics[f"perf/{pool}_tokens_per_s"] = total.get("tokens", 0.0) / total[f"{pool}_s"]
    if total.get("payload_bytes"):
        metrics["perf/teacher_bytes_per_token"] = total["payload_bytes"] / max(
            total.get("response_tokens", 1.0), 1.0
        )
    return metrics


def _progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One compact line per report for whoever watches the driver's output."""
    shown = [
        ("loss", "loss"),
        ("acc", "rewards/accuracies"),
        ("margin", "rewards/margins"),
        ("eval_acc", "eval/rewards/accuracies"),
        ("tok/s", "perf/tokens_per_s"),
    ]
    parts = [f"{name} {metrics[key]:.4g}" for name, key in shown if key in metrics]
    return f"[tvkd] step {step}/{total}  " + "  ".join(parts)


def _save_hf_model(model, tokenizer, model_dir: Path) -> None:
    """Final model as a Hugging Face directory (safetensors) with its tokenizer, atomically."""
    tmp = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
