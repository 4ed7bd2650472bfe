"""The single-process baseline: the pipeline's own pieces run one after the other in this
process, so the ratio of a Ray run to it measures the pipeline's overhead, not a difference in
maths."""

from __future__ import annotations

import time
from dataclasses import replace

import pyarrow as pa
import torch

from actors.inference import FrozenModel
from benchmarks.common import Bench
from benchmarks.report import median
from driver.inputs import ModelPaths
from driver.pools import roles
from tvkd_ray.config import TVKDConfig
from tvkd_ray.forward import ResponseLogps
from tvkd_ray.models import load_model, load_tokenizer
from tvkd_ray.step import Objective, StudentStep, apply_gradients


def bare_loop(
    bench: Bench,
    batches: list[pa.Table],
    cfg: TVKDConfig,
    *,
    threads: int,
    precompute_reference: bool = False,
) -> list[dict]:
    """The single-process baseline of the run ``cfg``, one record per batch: its tokens, loss and
    ``seconds`` per stage (``teacher``, ``reference``, ``student``) and in all (``total``).

    Per batch: the teacher's potentials (when ``cfg`` uses the teacher); the reference log-probs
    (live, or computed for all batches before timing starts, as TRL's ``precompute_ref_log_probs``
    does); the student's forward and loss, backward, clipping and AdamW step. The frozen stages are
    the actor pools' own classes and specs, run as plain objects; the student's step is the Ray
    Train workers' ``StudentStep`` and ``apply_gradients``.
    """
    loop = BareLoop(bench, cfg, threads)
    tables, live = batches, dict(loop.frozen)
    if precompute_reference:
        reference = live.pop("reference")
        tables = [reference(table) for table in batches]
    return [loop.train_on(table, live) for table in tables]


def frozen_stages(bench: Bench, cfg: TVKDConfig, threads: int) -> dict[str, FrozenModel]:
    """The run's teacher and reference actors by role, in pipeline order, with the specs the
    driver gives its pools, placed here: ``threads`` threads at normal priority (on CPU the pools'
    actors run at idle priority, which would outlast the baseline in this process)."""
    student = bench.model("student")
    paths = ModelPaths(
        student_init=student, reference=student, tokenizer=student, teacher=bench.model("teacher")
    )
    return {
        role.name: role.actor(replace(role.spec, num_threads=threads, idle_priority=False))
        for role in roles(cfg, paths)
    }


class BareLoop:
    """The frozen stages and the student's step of one baseline run, on ``threads`` threads."""

    def __init__(self, bench: Bench, cfg: TVKDConfig, threads: int):
        torch.set_num_threads(threads)
        self.frozen = frozen_stages(bench, cfg, threads)
        self.model = load_model(bench.model("student"))
        pad_id = load_tokenizer(bench.model("student")).pad_token_id
        policy = ResponseLogps(self.model).train()
        self.step = StudentStep(Objective.from_config(cfg), policy, pad_id, "cpu")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr)
        self.max_grad_norm = cfg.train.max_grad_norm

    def train_on(self, table: pa.Table, stages: dict[str, FrozenModel]) -> dict:
        """One timed batch: ``stages`` in order on the tokenised table, then the student's
        optimiser step on the scored table."""
        seconds = {}
        start = lap = time.perf_counter()
        for name, stage in stages.items():
            table = stage(table)
            now = time.perf_counter()
            seconds[name], lap = now - lap, now
        self.optimizer.zero_grad(set_to_none=True)
        loss, sums = self.step(table)
        loss.backward()
        apply_gradients(self.model, self.optimizer, self.max_grad_norm)
        now = time.perf_counter()
        seconds["student"], seconds["total"] = now - lap, now - start
        return {"tokens": int(sums["tokens"]), "loss": loss.item(), "seconds": seconds}


def bare_summary(records: list[dict], warmup: int) -> dict:
    """Median tokens/s and per-stage seconds over the batches after the warm-up."""
    kept = records[warmup:]
    stages = kept[0]["seconds"] if kept else {}
    return {
        "batches_measured": len(kept),
        "tokens_per_s": median([r["tokens"] / r["seconds"]["total"] for r in kept]),
        "tokens_per_step": median([r["tokens"] for r in kept]),
        "seconds": {stage: median([r["seconds"][stage] for r in kept]) for stage in stages},
    }
