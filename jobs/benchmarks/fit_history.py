"""Ray runs via ``tvkd_ray.fit``, read back from their per-step MLflow history: the steady state
(medians over the steps after the warm-up) and what each Ray Data actor pool did meanwhile."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import Bench
from benchmarks.report import median
from tvkd_ray.config import TVKDConfig

# What the steady state reads of the trainer's MLflow metrics, by the name it gives each.
HISTORY_KEYS = {
    "tokens_per_s": "perf/tokens_per_s",
    "step_s": "timing_s/step",
    "wait_s": "timing_s/wait_teacher",
    "num_tokens": "num_tokens",
}


def fit_steady_state(bench: Bench, cfg: TVKDConfig) -> dict:
    """Run ``tvkd_ray.fit`` and read its per-step MLflow history back: medians over the steps
    after the warm-up of tokens/s, step time, data wait, and the time between steps that the
    step itself does not cover (metric reporting and logging); plus what each Ray Data actor
    pool did meanwhile."""
    result, wall_s, operators = timed_fit(cfg)
    history = metric_history(result.tracking_uri, result.mlflow_run_id)
    return {
        "run": cfg.run.name,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": result.tracking_uri,
        "steps": len(history["tokens_per_s"]),
        "steps_measured": len(history["step_s"][bench.plan.warmup :]),
        "wall_s": wall_s,
        **steady_state(history, bench.plan.warmup),
        "teacher_bytes_per_token": result.metrics.get("perf/teacher_bytes_per_token"),
        "ray_data_operators": operators,
    }


def timed_fit(cfg: TVKDConfig):
    """(fit's result, its wall seconds, the Ray Data operators' figures of its session)."""
    import tvkd_ray

    # fit() starts a private Ray instance; a Ray temp folder of our own makes its session logs
    # (Ray Data's operator metrics) ours alone on a machine where others run Ray too.
    ray_tmp = Path(tempfile.mkdtemp(prefix="tvkd-ray-"))
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(ray_tmp)
    try:
        start = time.perf_counter()
        result = tvkd_ray.fit(cfg)
        wall_s = time.perf_counter() - start
        operators = ray_data_operators(ray_tmp)
    finally:
        if previous is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return result, wall_s, operators


def metric_history(tracking_uri: str, run_id: str) -> dict[str, list[float]]:
    """Every value of each HISTORY_KEYS metric of the run, in step order."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    return {
        name: [
            m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ]
        for name, key in HISTORY_KEYS.items()
    }


def steady_state(history: dict[str, list[float]], warmup: int) -> dict:
    """Medians (and whole-span figures) over the reported steps after the first ``warmup``."""
    # Tokens of each step from the running total, then the whole time between two reports.
    tokens = [b - a for a, b in zip([0.0, *history["num_tokens"]], history["num_tokens"])]
    window = [n / r for n, r in zip(tokens, history["tokens_per_s"])]
    keep = slice(warmup, None)
    step_s, wait_s = history["step_s"][keep], history["wait_s"][keep]
    return {
        "tokens_per_s": median(history["tokens_per_s"][keep]),
        # Whole measured span (total tokens / total time), less sensitive to odd steps.
        "tokens_per_s_overall": sum(tokens[keep]) / sum(window[keep]) if step_s else float("nan"),
        "tokens_per_step": median(tokens[keep]),
        "window_s": median(window[keep]),
        "step_s": median(step_s),
        "wait_s": median(wait_s),
        "wait_share": sum(wait_s) / sum(step_s) if step_s else float("nan"),
        "report_s": median([w - s for w, s in zip(window[keep], step_s)]),
    }


def ray_data_operators(ray_tmp: Path) -> dict[str, dict]:
    """Batches run and mean seconds in the UDF per batch of every ``map_batches`` operator, from
    the last operator-metrics dump in Ray Data's log of the run's session: the one written when
    the operator completed, else the last periodic one (a few seconds stale). These are DEBUG
    lines whose format may change between Ray versions: empty when nothing matches."""
    last: dict[str, str] = {}
    for log in ray_tmp.glob("ray/session_*/logs/ray-data/ray-data.log"):
        completed = None  # operator whose final metrics are on the next line
        for line in log.read_text(errors="replace").splitlines():
            if completed and line.startswith("{"):
                last[completed] = line
            completed = None
            if match := re.search(r"MapBatches\((\w+)\)\] completed\. Operator Metrics:$", line):
                completed = match.group(1)
            elif match := re.match(r"MapBatches\((\w+)\): (\{.*\})$", line):
                last[match.group(1)] = match.group(2)
    operators = {}
    for name, body in last.items():
        fields = {k: float(v) for k, v in re.findall(r"'(\w+)': ([0-9.]+)[,}]", body)}
        batches = int(fields.get("num_task_outputs_generated", 0))
        udf_s = fields.get("function_body_time_s", float("nan"))
        operators[name] = {
            "batches": batches,
            "udf_s_total": udf_s,
            "udf_s_per_batch": udf_s / batches if batches else float("nan"),
        }
    return operators
