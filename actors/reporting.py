"""What a student worker reports: pair-weighted metric means over a window of steps, gathered
across the workers, and one progress line per report for whoever watches the driver."""

from __future__ import annotations

import time

from actors.lockstep import Collective
from tvkd_ray import schema

# Sums over the step (not means over pairs) when aggregated across workers.
COUNTS = ("pairs", "tokens", "response_tokens", "payload_bytes", "wait_s", "step_s")
ACTOR_SECONDS = {"teacher": schema.TEACHER_S, "reference": schema.REFERENCE_S}


class MetricWindow:
    """Metric sums of the optimiser steps since the last report."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.grad_norm = 0.0
        self.start = time.perf_counter()

    def add(self, step_sums: dict[str, float], grad_norm: float) -> None:
        for k, v in step_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.grad_norm = grad_norm

    def metrics(self, collective: Collective, learning_rate: float, num_tokens: int) -> dict:
        """SPEC §2.5 train metrics of the window: means over every worker's pairs, throughput
        and timing; ``num_tokens`` is the running total before this window."""
        total = collective.sum_by_key(self.sums)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        pairs = max(total.get("pairs", 0.0), 1.0)
        steps = max(self.steps, 1)
        skip = set(COUNTS) | set(ACTOR_SECONDS.values())
        metrics = {k: v / pairs for k, v in total.items() if k not in skip}
        metrics.update(
            {
                "grad_norm": self.grad_norm,
                "learning_rate": learning_rate,
                "num_tokens": float(num_tokens + int(total.get("tokens", 0.0))),
                "perf/tokens_per_s": total.get("tokens", 0.0) / elapsed,
                "perf/pairs_per_s": total.get("pairs", 0.0) / elapsed,
                "timing_s/step": total.get("step_s", 0.0) / collective.world / steps,
                "timing_s/wait_teacher": total.get("wait_s", 0.0) / collective.world / steps,
            }
        )
        for pool, seconds in ACTOR_SECONDS.items():
            if total.get(seconds):
                # Per actor: the tokens one actor scores per second of its own compute.
                metrics[f"perf/{pool}_tokens_per_s"] = total.get("tokens", 0.0) / total[seconds]
        if total.get("payload_bytes"):
            per_token = total["payload_bytes"] / max(total.get("response_tokens", 1.0), 1.0)
            metrics["perf/teacher_bytes_per_token"] = per_token
        return metrics


def eval_means(collective: Collective, sums: dict[str, float]) -> dict[str, float]:
    """``eval/`` means over every worker's eval pairs of the summed step metrics: quality only,
    so the eval group of the UI holds the train names' counterparts (the actor seconds of the
    eval pairs are throughput, measured in training)."""
    total = collective.sum_by_key({**sums, "pairs": sums.get("pairs", 0.0)})
    pairs = max(total.pop("pairs"), 1.0)
    skip = set(COUNTS) | set(ACTOR_SECONDS.values())
    kept = {k: v for k, v in total.items() if k not in skip}
    return {f"eval/{k}": v / pairs for k, v in kept.items()}


def progress_line(metrics: dict[str, float]) -> str:
    """The metrics of a report's progress line, compactly."""
    shown = [
        ("loss", "loss"),
        ("acc", "rewards/accuracies"),
        ("margin", "rewards/margins"),
        ("eval_acc", "eval/rewards/accuracies"),
        ("tok/s", "perf/tokens_per_s"),
    ]
    parts = [f"{name} {metrics[key]:.4g}" for name, key in shown if key in metrics]
    return "  ".join(parts)
