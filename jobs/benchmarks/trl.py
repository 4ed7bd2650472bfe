"""``trl``: DPO mode (α = 0) of tvkd-ray vs TRL's ``DPOTrainer`` with precomputed reference
log-probs, same model, data, batch size and lengths; the bare loop for reference."""

from __future__ import annotations

import time

import torch

from benchmarks.bare import bare_loop, bare_summary
from benchmarks.common import BATCH_PAIRS, TARGETS, THREADS, Bench
from benchmarks.fit_history import fit_steady_state
from benchmarks.report import median, table
from tvkd_ray import schema
from tvkd_ray.config import TVKDConfig
from tvkd_ray.models import load_model, load_tokenizer


def run(bench: Bench) -> tuple[dict, str]:
    plan = bench.plan
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        reason = f"trl is not installed ({exc}); install the bench extra: pip install -e '.[bench]'"
        return {"status": "skipped", "reason": reason}, f"skipped: {reason}"
    # The trainer gets every core, as TRL and the bare loop do; the reference log-probs are
    # computed before training (reference.cache=memory, the default), as TRL's
    # precompute_ref_log_probs does.
    cfg = bench.config(
        "dpo",
        [
            "run.stage=dpo",
            "reference.cache=memory",
            "train.num_workers=1",
            f"train.num_cpus_per_worker={THREADS}",
            f"train.max_steps={plan.steps}",
        ],
    )
    batches = bench.batches()[: plan.steps]
    records = bare_loop(bench, batches, cfg, threads=THREADS, precompute_reference=True)
    runs = {
        "bare_loop": bare_summary(records, plan.warmup),
        "trl": trl_dpo(bench),
        "tvkd_ray": fit_steady_state(bench, cfg),
    }
    return results(bench, cfg, runs), text(runs)


def results(bench: Bench, cfg: TVKDConfig, runs: dict) -> dict:
    ray_run, trl_run, bare = runs["tvkd_ray"], runs["trl"], runs["bare_loop"]
    return {
        "mode": "run.stage=dpo (alpha = 0), reference log-probs precomputed by both",
        "settings": {
            "batch_pairs": BATCH_PAIRS,
            "steps": bench.plan.steps,
            "warmup": bench.plan.warmup,
            "threads": THREADS,
            "max_length": cfg.data.max_length,
        },
        "tvkd_ray": ray_run,
        "trl": trl_run,
        "bare_loop": bare,
        "ratio_tvkd_over_trl": ray_run["tokens_per_s"] / trl_run["tokens_per_s"],
        "ratio_tvkd_over_bare": ray_run["tokens_per_s"] / bare["tokens_per_s"],
        "ratio_trl_over_bare": trl_run["tokens_per_s"] / bare["tokens_per_s"],
        "target_ratio": TARGETS["trl"],
    }


def text(runs: dict) -> str:
    ray_run, trl_run, bare = runs["tvkd_ray"], runs["trl"], runs["bare_loop"]
    bare_rate = bare["tokens_per_s"]
    rows = [
        [
            "tvkd-ray fit, run.stage=dpo",
            ray_run["tokens_per_s"],
            ray_run["tokens_per_s"] / bare_rate,
            ray_run["window_s"],
        ],
        [
            "TRL DPOTrainer, precompute_ref_log_probs",
            trl_run["tokens_per_s"],
            trl_run["tokens_per_s"] / bare_rate,
            trl_run["tokens_per_step"] / trl_run["tokens_per_s"],
        ],
        ["bare loop", bare_rate, 1.0, bare["seconds"]["total"]],
    ]
    ratio = ray_run["tokens_per_s"] / trl_run["tokens_per_s"]
    out = table(["path", "tokens/s", "x bare", "s/step"], rows)
    out += f"\nratio tvkd-ray / TRL = {ratio:.2f} (target >= {TARGETS['trl']})"
    out += (
        f"\ntvkd-ray per step: {ray_run['step_s']:.3f} s in the step, "
        f"{ray_run['report_s']:.3f} s between steps (ray.train.report, MLflow)"
    )
    return out


def trl_dpo(bench: Bench) -> dict:
    """TRL's DPOTrainer on the same student, pairs (same order), batch size, lengths and loss
    settings; per-step tokens/s between consecutive step ends, as tvkd-ray's trainer reports."""
    from transformers import PrinterCallback
    from trl import DPOTrainer

    torch.set_num_threads(THREADS)
    cfg = bench.config("trl", [])
    dataset = trl_dataset(bench)
    clock = step_clock()
    args = dpo_config(bench, cfg)
    model = load_model(bench.model("student"))
    tokenizer = load_tokenizer(bench.model("student"))
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # one printed dict per step would drown the tables
    setup_s = time.perf_counter() - start  # tokenising and the reference precompute
    trainer.train()
    return {"setup_and_precompute_s": setup_s, **per_step(clock, bench.plan.warmup)}


def trl_dataset(bench: Bench):
    """Only the pairs it trains on: TRL precomputes reference log-probs for the whole dataset."""
    from datasets import Dataset

    pairs = bench.pairs().slice(0, bench.plan.steps * BATCH_PAIRS)
    columns = (schema.PROMPT, schema.CHOSEN, schema.REJECTED)  # TRL's names for them too
    return Dataset.from_dict({k: pairs.column(k).to_pylist() for k in columns})


def dpo_config(bench: Bench, cfg: TVKDConfig):
    """TRL's settings matching the tvkd-ray run's."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(bench.scratch / "trl"),
        per_device_train_batch_size=BATCH_PAIRS,
        max_length=cfg.data.max_length,
        precompute_ref_log_probs=True,
        beta=cfg.loss.beta,
        learning_rate=cfg.train.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.train.warmup_ratio,  # below 1: a share of the steps
        max_grad_norm=cfg.train.max_grad_norm,
        max_steps=bench.plan.steps,
        logging_steps=1,
        # TRL defaults to bf16 and gradient checkpointing; tvkd-ray trains fp32 without
        # checkpointing on CPU (bf16 is 5x slower here, SPEC §9), so match it.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        train_sampling_strategy="sequential",  # the shuffled order fit() trains in
        dataloader_num_workers=0,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=cfg.run.seed,
    )


def step_clock():
    """A TrainerCallback recording when training began, when each step ended and the running
    token count TRL logs at each step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: dict[int, float] = {}
            self.tokens: dict[int, float] = {}
            self.start = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.tokens[state.global_step] = float(logs["num_tokens"])

    return StepClock()


def per_step(clock, warmup: int) -> dict:
    """Median tokens/s and tokens per step after the warm-up, from the clock's records."""
    steps = sorted(clock.ends)
    rates, tokens = [], []
    previous_end, previous_tokens = clock.start, 0.0
    for step in steps:
        n = clock.tokens[step] - previous_tokens
        rates.append(n / (clock.ends[step] - previous_end))
        tokens.append(n)
        previous_end, previous_tokens = clock.ends[step], clock.tokens[step]
    keep = slice(warmup, None)
    return {
        "steps": len(steps),
        "steps_measured": len(rates[keep]),
        "tokens_per_s": median(rates[keep]),
        "tokens_per_step": median(tokens[keep]),
    }
