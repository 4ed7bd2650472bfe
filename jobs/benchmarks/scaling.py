"""``scaling``: DPO-mode tokens/s of ``tvkd_ray.fit`` with 1, 2 and 4 Ray Train workers (one CPU
each), the reference log-probs precomputed. On a 2-core machine 4 workers over-commit the cores:
read that row as the cost of the plumbing (lockstep, all-reduce, placeholders), not a speed-up."""

from __future__ import annotations

from benchmarks.common import BATCH_PAIRS, Bench
from benchmarks.fit_history import fit_steady_state
from benchmarks.report import table

WORKERS = (1, 2, 4)


def run(bench: Bench) -> tuple[dict, str]:
    plan = bench.plan
    runs = {}
    for workers in WORKERS:
        cfg = bench.config(
            f"scaling{workers}",
            [
                "run.stage=dpo",
                # The default, spelled out: the reference log-probs are computed before training.
                "reference.cache=memory",
                f"train.num_workers={workers}",
                "train.num_cpus_per_worker=1",
                f"train.max_steps={plan.steps}",
            ],
        )
        runs[workers] = fit_steady_state(bench, cfg)
    speedup = runs[2]["tokens_per_s"] / runs[1]["tokens_per_s"]
    relative = {w: r["tokens_per_s"] / runs[1]["tokens_per_s"] for w, r in runs.items()}
    results = {
        "mode": "run.stage=dpo (alpha = 0), reference precomputed (reference.cache=memory)",
        "settings": {
            "batch_pairs_per_worker": BATCH_PAIRS,
            "cpus_per_worker": 1,
            "steps": plan.steps,
            "warmup": plan.warmup,
        },
        "runs": {str(k): v for k, v in runs.items()},
        "speedup_2_over_1": speedup,
        "tokens_per_s_over_1_worker": {str(w): v for w, v in relative.items()},
    }
    rows = [
        [w, r["tokens_per_s"], relative[w], r["step_s"], r["report_s"], r["wait_share"]]
        for w, r in runs.items()
    ]
    header = ["workers", "tokens/s", "x 1 worker", "s in step", "s between steps", "wait share"]
    text = table(header, rows)
    text += f"\nspeed-up 2 workers / 1 = {speedup:.2f} (ideal 2.0 with a core per worker)"
    return results, text
