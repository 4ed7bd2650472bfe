"""``students``: what the student set-ups cost per optimiser step, in this process, on the bench
student and the bundled batches (reference log-probs precomputed by the reference actor class):
full fine-tuning with and without gradient checkpointing, LoRA (r = 16, every linear layer) with
and without it, and LoRA plus the reference scored in the trainer with its adapters off (as TRL
does with a PEFT model) instead of by the reference actors."""

from __future__ import annotations

import time

import torch

from actors.inference import FrozenModelSpec
from actors.reference import ReferenceLogps
from benchmarks.common import THREADS, Bench
from benchmarks.report import median, table
from tvkd_ray.config import TVKDConfig
from tvkd_ray.data import collate
from tvkd_ray.forward import ResponseLogps
from tvkd_ray.models import load_student, load_tokenizer
from tvkd_ray.step import Objective, StudentStep, apply_gradients

SETUPS = {
    "full": ([], False),
    "full + checkpointing": (["train.gradient_checkpointing=true"], False),
    "lora": (["student.lora.r=16"], False),
    "lora + checkpointing": (["student.lora.r=16", "train.gradient_checkpointing=true"], False),
    "lora + reference in trainer": (["student.lora.r=16"], True),
}


def run(bench: Bench) -> tuple[dict, str]:
    torch.set_num_threads(THREADS)
    plan = bench.plan
    batches = bench.batches()[: plan.steps]
    reference = ReferenceLogps(FrozenModelSpec(bench.model("student"), num_threads=THREADS))
    scored = [reference(b) for b in batches]
    runs = {}
    for name, (overrides, reference_in_trainer) in SETUPS.items():
        cfg = bench.config("students", ["run.stage=dpo", *overrides])
        seconds = step_seconds(bench, cfg, scored, reference_in_trainer)
        runs[name] = {"step_s": median(seconds[plan.warmup :]), "overrides": overrides}
    full, lora = runs["full"]["step_s"], runs["lora"]["step_s"]
    for r in runs.values():
        r["x_full"], r["x_lora"] = r["step_s"] / full, r["step_s"] / lora
    rows = [[name, r["step_s"], r["x_full"], r["x_lora"]] for name, r in runs.items()]
    text = table(["set-up", "s per step", "x full", "x lora"], rows)
    return {"threads": THREADS, "steps": plan.steps, "warmup": plan.warmup, "runs": runs}, text


def step_seconds(bench: Bench, cfg: TVKDConfig, scored: list, reference_in_trainer: bool):
    """Seconds of each optimiser step (forward, backward, clip, AdamW) of the set-up ``cfg``."""
    path = bench.model("student")
    model = load_student(
        path, cfg.student, gradient_checkpointing=cfg.train.gradient_checkpointing
    ).train()
    pad_id = load_tokenizer(path).pad_token_id
    policy = ResponseLogps(model)
    step = StudentStep(Objective.from_config(cfg), policy, pad_id, "cpu")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    seconds = []
    for batch in scored:
        start = time.perf_counter()
        if reference_in_trainer:
            # What TRL does with a PEFT student: the base, adapters off, scores the reference.
            with torch.no_grad(), model.disable_adapter():
                policy(*step_inputs(batch, pad_id))
        optimizer.zero_grad(set_to_none=True)
        loss, _ = step(batch)
        loss.backward()
        apply_gradients(model, optimizer, cfg.train.max_grad_norm)
        seconds.append(time.perf_counter() - start)
    return seconds


def step_inputs(table, pad_id: int):
    batch = collate(table, pad_id)
    return batch.input_ids, batch.attention_mask, batch.response_mask
