"""Benchmarks of SPEC §7, each ratio measured side by side in one run on one machine.

    .venv/bin/python jobs/bench.py [--quick] [--suites pipeline,teacher,payload,trl,scaling]
                                   [--out-dir bench-results]

Suites (all use config-built Llama models with the SmolLM2 tokenizer's 49,152-token vocabulary:
teacher 8 layers x 256, student 4 layers x 256; the bundled dataset; fp32 on CPU):

* ``pipeline``: steady-state tokens/s of ``tvkd_ray.fit`` (teacher pool -> reference pool -> one
  Ray Train worker, ``teacher.cache=none`` so the teacher streams every batch, on data long
  enough that it still streams at the last measured step) over a bare single-process loop doing
  the same teacher, reference and student work on the same batches;
  the share of step time the trainer waits for data; per-stage costs to show where time goes.
* ``teacher``: peak RSS growth and time of the chunked potentials vs full logits, several sizes.
* ``payload``: Arrow bytes per response token the teacher adds (Φ only, and with top-32).
* ``trl``: DPO mode (α = 0) of tvkd-ray vs TRL's ``DPOTrainer`` with precomputed reference
  log-probs, same model, data, batch size and lengths; the bare loop for reference.
* ``scaling``: DPO-mode tokens/s with 1 and 2 Ray Train workers (one CPU each).

Tokens are counted as the trainer counts them: non-pad tokens of the 2B-row (chosen + rejected)
batches. Steady state drops the first steps (start-up, lazy allocations) and takes medians of
per-step rates. Each suite prints a table and writes ``<out-dir>/<suite>.json`` with the figures,
settings, machine, versions, command and timestamps; the MLflow runs go to
``<out-dir>/mlflow.db``. On an idle 2-core machine ``--quick`` takes ~6 min (each of its four Ray
runs spends about a minute starting and stopping), the full mode ~11 min.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Before Ray or transformers are imported: offline models, no auth prompt or usage reporting on
# the private local cluster that fit() starts (SPEC §9).
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)

# Runs as a script from a checkout: the repository for the packages, this folder for
# measure_teacher, whose payload and memory measurements the payload and teacher suites reuse.
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from tvkd_ray.api import ALLOCATOR_ENV  # noqa: E402

# The single-process baselines (bare loop, TRL) run with the allocator settings fit() gives its
# Ray processes, so the ratios compare frameworks, not mallocs; glibc reads them at start-up.
if any(os.environ.get(key) != value for key, value in ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})

import measure_teacher  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from tvkd_ray.config import BUNDLED_DATA, TVKDConfig, load_config  # noqa: E402
from tvkd_ray.data import collate, tokenize_batch  # noqa: E402
from tvkd_ray.forward import ResponseLogps, lm_head_params, response_hidden, row_sums  # noqa: E402
from tvkd_ray.loss import tvkd_loss  # noqa: E402
from tvkd_ray.models import load_model, load_tokenizer  # noqa: E402
from tvkd_ray.potentials import (  # noqa: E402
    DEFAULT_CHUNK_BYTES,
    soft_value_from_hidden,
    token_logps_from_hidden,
)

SUITES = ("pipeline", "teacher", "payload", "trl", "scaling")
TOKENIZER = "smollm2-135m-instruct"  # its 49,152-token vocabulary; the models are config-built
TEACHER_SHAPE = {"layers": 8, "width": 256}
STUDENT_SHAPE = {"layers": 4, "width": 256}
BATCH_PAIRS = 8
STREAM_REPEATS = 4  # 248 batches: more than the pipeline's actors run ahead in the full plan
THREADS = os.cpu_count() or 1  # the single-process baselines use the whole machine
TARGETS = {"pipeline": 0.85, "wait_share": 0.05, "payload": 8.0, "trl": 1.7}
# A 1-minute load average above this many times the CPU count means other work competed with the
# benchmark. Its own runs reach ~1.6x on 2 CPUs: the pipeline keeps three processes runnable (the
# idle-priority actors count too), plus Ray's own.
BUSY_LOAD = 2.0


@dataclass(frozen=True)
class Plan:
    """How much each suite measures; ``--quick`` trades precision for minutes."""

    steps: int  # optimiser steps per timed training run (Ray fit, TRL, bare loop)
    warmup: int  # first steps of every run left out of the steady-state medians
    bare_rounds: int  # bare-loop passes in the pipeline suite: before, and after, the Ray run
    profile_batches: int  # batches of the per-stage profile at one thread (as in the pipeline)
    memory_cases: tuple[tuple[int, int], ...]  # (positions, vocab) of the teacher suite
    memory_repeats: int  # fresh processes per case and path (median taken)
    payload_batches: int  # batches of BATCH_PAIRS pairs per dataset in the payload suite


QUICK = Plan(
    steps=10,
    warmup=3,
    bare_rounds=1,
    profile_batches=3,
    memory_cases=((2048, 49152), (2048, 128256)),
    memory_repeats=1,
    payload_batches=2,
)
FULL = Plan(
    steps=60,
    warmup=6,
    bare_rounds=2,
    profile_batches=12,
    # The full-logits path peaks near 3x the logits: 8192 x 128k would need ~12 GiB.
    memory_cases=(
        (2048, 32000),
        (2048, 49152),
        (2048, 128256),
        (8192, 32000),
        (8192, 49152),
        (4096, 128256),
    ),
    memory_repeats=3,
    payload_batches=8,
)


# ------------------------------------------------------------------------------ shared set-up


class Bench:
    """What the suites of one invocation share: the plan, the output folder, a scratch folder
    for models and run outputs, and the models and batches (built once, on first use)."""

    def __init__(self, plan: Plan, out_dir: Path, scratch: Path):
        self.plan = plan
        self.out_dir = out_dir
        self.scratch = scratch
        self._models: dict[str, str] = {}
        self._batches: dict[str, list[pa.Table]] = {}
        self._pairs: dict[str, pa.Table] = {}

    def model(self, role: str) -> str:
        """Directory of the teacher or student model (random init, fixed seed)."""
        if role not in self._models:
            shape, seed = (TEACHER_SHAPE, 0) if role == "teacher" else (STUDENT_SHAPE, 1)
            self._models[role] = build_llama(self.scratch / "models" / role, seed=seed, **shape)
        return self._models[role]

    def data_path(self, data: str) -> Path:
        """Training pairs: ``bundled``, or ``stream``, the bundled pairs STREAM_REPEATS times over,
        for the pipeline suite, whose actors would otherwise run through the 62 bundled batches
        early in the run and leave the trainer alone for the rest of the measured steps."""
        bundled = BUNDLED_DATA / "train.jsonl"
        if data == "bundled":
            return bundled
        path = self.scratch / "stream.jsonl"
        if not path.exists():
            path.write_text(bundled.read_text() * STREAM_REPEATS)
        return path

    def config(self, name: str, overrides: list[str], data: str = "bundled") -> TVKDConfig:
        """A run config on the bench models and ``data``, plus ``overrides``."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = [
            f"run.name=bench-{name}-{stamp}",
            f"run.output_dir={self.scratch / 'runs'}",
            f"student.model={self.model('student')}",
            "student.num_layers=null",
            f"teacher.model={self.model('teacher')}",
            f"teacher.batch_size={BATCH_PAIRS}",
            f"reference.batch_size={BATCH_PAIRS}",
            f"data.train_path={self.data_path(data)}",
            "data.eval_path=null",
            f"train.batch_size={BATCH_PAIRS}",
            "train.log_every=1",
            f"tracking.uri=sqlite:///{self.out_dir.resolve() / 'mlflow.db'}",
            "tracking.experiment=tvkd-bench",
        ]
        return load_config(None, base + overrides)

    def pairs(self, data: str = "bundled") -> pa.Table:
        """The training pairs, validated and shuffled exactly as ``fit`` does."""
        if data not in self._pairs:
            from tvkd_ray.pipeline import load_data

            cfg = self.config("data", [], data)
            self._pairs[data] = load_data(cfg, load_tokenizer(self.model("student"))).train
        return self._pairs[data]

    def batches(self, data: str = "bundled") -> list[pa.Table]:
        """Tokenised batches of BATCH_PAIRS pairs, in the order the Ray trainer receives them."""
        if data not in self._batches:
            cfg = self.config("data", [], data)
            tokens = tokenize_batch(
                self.pairs(data),
                load_tokenizer(self.model("student")),
                max_length=cfg.data.max_length,
                max_prompt_length=cfg.data.max_prompt_length,
            )
            self._batches[data] = [
                tokens.slice(i, BATCH_PAIRS) for i in range(0, tokens.num_rows, BATCH_PAIRS)
            ]
        return self._batches[data]


def build_llama(out_dir: Path, *, layers: int, width: int, seed: int) -> str:
    """A Llama of ``layers`` x ``width`` with the SmolLM2 tokenizer, saved with it to ``out_dir``.

    Shaped like SmolLM2 scaled down (64-wide heads, 2 query heads per KV head, the 8/3 MLP ratio,
    tied embeddings), so the 49,152-token LM head weighs as it does in the real models.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(TOKENIZER)
    heads = width // 64
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=math.ceil(8 * width / 3 / 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def machine() -> dict:
    """Where the numbers come from: CPU, memory, load and library versions."""
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for package in ("torch", "ray", "transformers", "trl", "mlflow", "pyarrow", "tvkd-ray"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        # Other users' load makes timings noisy; recorded so readers can judge.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads_baselines": THREADS,
        "versions": versions,
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table; numbers are right-aligned."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------- Ray runs via fit()


def fit_steady_state(bench: Bench, cfg: TVKDConfig) -> dict:
    """Run ``tvkd_ray.fit`` and read its per-step MLflow history back: medians over the steps
    after the warm-up of tokens/s, step time, data wait, and the time between steps that the
    step itself does not cover (metric reporting and logging); plus what each Ray Data actor
    pool did meanwhile."""
    import mlflow

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
    client = mlflow.MlflowClient(result.tracking_uri)
    keys = {
        "tokens_per_s": "perf/tokens_per_s",
        "step_s": "timing_s/step",
        "wait_s": "timing_s/wait_teacher",
        "num_tokens": "num_tokens",
    }
    history = {
        name: [
            m.value
            for m in sorted(
                client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step
            )
        ]
        for name, key in keys.items()
    }
    # Tokens of each step from the running total, then the whole time between two reports.
    tokens = [b - a for a, b in zip([0.0, *history["num_tokens"]], history["num_tokens"])]
    window = [n / r for n, r in zip(tokens, history["tokens_per_s"])]
    keep = slice(bench.plan.warmup, None)
    step_s, wait_s = history["step_s"][keep], history["wait_s"][keep]
    return {
        "run": cfg.run.name,
        "mlflow_run_id": result.mlflow_run_id,
        "tracking_uri": result.tracking_uri,
        "steps": len(history["tokens_per_s"]),
        "steps_measured": len(step_s),
        "wall_s": wall_s,
        "tokens_per_s": median(history["tokens_per_s"][keep]),
        # Whole measured span (total tokens / total time), less sensitive to odd steps.
        "tokens_per_s_overall": sum(tokens[keep]) / sum(window[keep]) if step_s else float("nan"),
        "tokens_per_step": median(tokens[keep]),
        "window_s": median(window[keep]),
        "step_s": median(step_s),
        "wait_s": median(wait_s),
        "wait_share": sum(wait_s) / sum(step_s) if step_s else float("nan"),
        "report_s": median([w - s for w, s in zip(window[keep], step_s)]),
        "teacher_bytes_per_token": result.metrics.get("perf/teacher_bytes_per_token"),
        "ray_data_operators": operators,
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


# ---------------------------------------------------------------------- the bare-loop baseline


def bare_loop(
    bench: Bench,
    batches: list[pa.Table],
    *,
    threads: int,
    teacher: bool,
    alpha: float,
    precompute_reference: bool = False,
) -> list[dict]:
    """The single-process baseline, one record of stage timings per batch.

    Per batch: collate; the teacher's potentials (when ``teacher``); the reference log-probs
    (live, or computed for all batches before timing starts, as TRL's ``precompute_ref_log_probs``
    does); the student's forward, loss, backward, clipping and AdamW step. It calls the same
    library functions as the actors and the trainer (hidden states of response-predicting
    positions, chunked LM head), so the ratio to it measures the pipeline's overhead, not a
    difference in maths.
    """
    torch.set_num_threads(threads)
    cfg = bench.config("bare", [])
    pad_id = load_tokenizer(bench.model("student")).pad_token_id
    student = load_model(bench.model("student"))
    policy = ResponseLogps(student).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr)
    reference = load_model(bench.model("student")).eval()
    teacher_model = load_model(bench.model("teacher")).eval() if teacher else None

    @torch.inference_mode()
    def frozen(model, batch, potentials: bool) -> torch.Tensor:
        mask = batch["response_mask"]
        hidden = response_hidden(model, batch["input_ids"], batch["attention_mask"], mask)
        weight, bias = lm_head_params(model)
        if potentials:
            phi = torch.zeros(mask.shape)
            phi[mask] = soft_value_from_hidden(hidden, weight, bias)
            return phi
        logps = token_logps_from_hidden(hidden, weight, batch["input_ids"][mask], bias)
        return row_sums(logps, mask)

    precomputed = []
    if precompute_reference:
        precomputed = [frozen(reference, collate(t, pad_id), False) for t in batches]
    records = []
    for i, table in enumerate(batches):
        times = {"start": time.perf_counter()}
        batch = collate(table, pad_id)
        mask, n = batch["response_mask"], table.num_rows
        phi = None
        if teacher_model is not None:
            phi = frozen(teacher_model, batch, True)
            times["teacher"] = time.perf_counter()
        ref = precomputed[i] if precompute_reference else frozen(reference, batch, False)
        times["reference"] = time.perf_counter()
        logps, _ = policy(batch["input_ids"], batch["attention_mask"], mask)
        seq = row_sums(logps, mask)
        out = tvkd_loss(
            seq[:n],
            seq[n:],
            ref[:n],
            ref[n:],
            None if phi is None else phi[:n],
            None if phi is None else phi[n:],
            mask[:n],
            mask[n:],
            beta=cfg.loss.beta,
            alpha=alpha,
            gamma=cfg.loss.gamma,
            center=cfg.loss.center_potentials,
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        times["student"] = time.perf_counter()
        record = {"tokens": int(batch["attention_mask"].sum())}
        previous = times["start"]
        for stage in ("teacher", "reference", "student"):
            if stage in times:
                record[f"{stage}_s"] = times[stage] - previous
                previous = times[stage]
        record["total_s"] = previous - times["start"]
        records.append(record)
    return records


def bare_summary(records: list[dict], warmup: int) -> dict:
    """Median tokens/s and per-stage seconds over the batches after the warm-up."""
    kept = records[warmup:]
    summary = {
        "batches_measured": len(kept),
        "tokens_per_s": median([r["tokens"] / r["total_s"] for r in kept]),
        "tokens_per_step": median([r["tokens"] for r in kept]),
    }
    for key in ("teacher_s", "reference_s", "student_s", "total_s"):
        if kept and key in kept[0]:
            summary[key] = median([r[key] for r in kept])
    return summary


# ------------------------------------------------------------------------------------- suites


def suite_pipeline(bench: Bench) -> tuple[dict, str]:
    plan = bench.plan
    stream = bench.batches("stream")
    batches = stream[: plan.steps]
    cfg = bench.config(
        "pipeline",
        [
            "run.stage=tvkd",
            "teacher.cache=none",
            "train.num_workers=1",
            f"train.max_steps={plan.steps}",
        ],
        "stream",
    )
    alpha = cfg.loss.alpha
    bare_rounds = []

    def bare_round() -> None:
        records = bare_loop(bench, batches, threads=THREADS, teacher=True, alpha=alpha)
        bare_rounds.append(bare_summary(records, plan.warmup))

    # Baseline rounds around the Ray run (full mode) expose drift in the machine's load.
    bare_round()
    ray_run = fit_steady_state(bench, cfg)
    for _ in range(plan.bare_rounds - 1):
        bare_round()
    bare_rate = median([r["tokens_per_s"] for r in bare_rounds])
    # The stages alone at one thread, as each pipeline process runs them (one CPU each): the
    # pipeline overlaps them across processes, so the slowest one bounds its throughput.
    profile = bare_summary(
        bare_loop(bench, batches[: plan.profile_batches + 1], threads=1, teacher=True, alpha=alpha),
        warmup=1,
    )
    ratio = ray_run["tokens_per_s"] / bare_rate
    teacher_batches = ray_run["ray_data_operators"].get("TeacherPotentials", {}).get("batches")
    results = {
        "models": {"teacher": TEACHER_SHAPE, "student": STUDENT_SHAPE, "vocab": 49152},
        "settings": {
            "batch_pairs": BATCH_PAIRS,
            "steps": plan.steps,
            "warmup_steps_dropped": plan.warmup,
            "teacher_cache": cfg.teacher.cache,
            "data_batches": len(stream),
            "threads_bare_loop": THREADS,
            "cpus_pipeline": {
                "teacher": cfg.teacher.num_cpus_per_actor,
                "reference": cfg.reference.num_cpus_per_actor,
                "trainer": cfg.train.num_cpus_per_worker,
            },
            "bare_loop_potentials": "soft_value_from_hidden (chunked, response positions only)",
        },
        "pipeline": ray_run,
        # Whether the teacher was still streaming at the last step, rather than done with the
        # data and out of the trainer's way (unknown when Ray Data's log format changed).
        "streamed_throughout": None if teacher_batches is None else teacher_batches < len(stream),
        "bare_loop_rounds": bare_rounds,
        "bare_loop_tokens_per_s": bare_rate,
        "ratio": ratio,
        "target_ratio": TARGETS["pipeline"],
        "wait_share": ray_run["wait_share"],
        "target_wait_share": TARGETS["wait_share"],
        "stage_profile_1_thread": profile,
        "ratio_vs_bare_1_thread": ray_run["tokens_per_s"] / profile["tokens_per_s"],
    }
    rows = [
        ["TVKD pipeline (fit, 1 worker)", ray_run["tokens_per_s"], ray_run["window_s"]],
        *[
            [f"bare loop, {THREADS} threads, round {i + 1}", r["tokens_per_s"], r["total_s"]]
            for i, r in enumerate(bare_rounds)
        ],
        # Threads of one process stall each other when other work takes the cores; one thread
        # per process, as in the pipeline, is the comparison that survives a busy machine.
        ["bare loop, 1 thread (stage profile)", profile["tokens_per_s"], profile["total_s"]],
    ]
    text = table(["path", "tokens/s", "s/step"], rows)
    text += f"\nratio pipeline / bare = {ratio:.2f} (target >= {TARGETS['pipeline']})"
    text += (
        f"\nwait_teacher share of step time = {ray_run['wait_share']:.1%} "
        f"(target <= {TARGETS['wait_share']:.0%})\n\n"
    )
    stage_rows = [
        ["trainer: step (incl. wait)", "median s", ray_run["step_s"]],
        ["trainer: waiting for data", "median s", ray_run["wait_s"]],
        ["trainer: between steps (report, MLflow)", "median s", ray_run["report_s"]],
    ]
    for name, stage in (("TeacherPotentials", "teacher"), ("ReferenceLogps", "reference")):
        op = ray_run["ray_data_operators"].get(name)
        if op:
            stage_rows.append(
                [
                    f"{stage} actor ({op['batches']} of {len(stream)} batches run)",
                    "mean s/batch",
                    op["udf_s_per_batch"],
                ]
            )
    stage_rows += [
        [f"alone, 1 thread: {stage}", "median s", profile[f"{stage}_s"]]
        for stage in ("teacher", "reference", "student")
    ]
    stage_rows += [
        [f"bare loop, {THREADS} threads: {stage}", "median s", bare_rounds[0][f"{stage}_s"]]
        for stage in ("teacher", "reference", "student")
    ]
    text += table(["where the time goes (per step / batch)", "statistic", "s"], stage_rows)
    return results, text


def suite_teacher(bench: Bench) -> tuple[dict, str]:
    hidden_size = 576  # SmolLM2's width; the LM-head matmul cost scales with it
    cases = []
    for positions, vocab in bench.plan.memory_cases:
        runs = [
            measure_teacher.memory(positions, hidden_size, vocab)
            for _ in range(bench.plan.memory_repeats)
        ]
        case = {
            "positions": positions,
            "vocab": vocab,
            "hidden_size": hidden_size,
            "full_logits_fp32_mib": runs[0]["full_logits_fp32_mib"],
            "chunk_fp32_mib": DEFAULT_CHUNK_BYTES / 2**20,
        }
        for path in ("chunked", "full"):
            case[path] = {
                "peak_rss_growth_mib": median([r[path]["peak_rss_growth_mib"] for r in runs]),
                "seconds": median([r[path]["seconds"] for r in runs]),
                "repeats": len(runs),
            }
        cases.append(case)
    rows = [
        [
            c["positions"],
            c["vocab"],
            c["full_logits_fp32_mib"],
            c["chunked"]["peak_rss_growth_mib"],
            c["full"]["peak_rss_growth_mib"],
            c["chunked"]["seconds"],
            c["full"]["seconds"],
        ]
        for c in cases
    ]
    text = table(
        [
            "positions",
            "vocab",
            "logits MiB",
            "chunked peak MiB",
            "full peak MiB",
            "chunked s",
            "full s",
        ],
        rows,
    )
    text += (
        f"\npeak = RSS high-water growth of the computation in a fresh process (median of "
        f"{bench.plan.memory_repeats}); hidden {hidden_size}; {measure_teacher.THREADS} threads; "
        f"one chunk of fp32 logits <= {DEFAULT_CHUNK_BYTES / 2**20:.0f} MiB"
    )
    return {"cases": cases, "threads": measure_teacher.THREADS}, text


def suite_payload(bench: Bench) -> tuple[dict, str]:
    n = bench.plan.payload_batches
    datasets = {"bundled": bench.batches()[:n]}
    if measure_teacher.HH_PAIRS.exists():
        max_length = bench.config("data", []).data.max_length
        datasets["hh-rlhf-harmless"] = measure_teacher.batches(n, BATCH_PAIRS, max_length)
    figures = {
        name: measure_teacher.payload(tables, bench.model("teacher"))
        for name, tables in datasets.items()
    }
    topk = f"potentials + top-{measure_teacher.TOP_K}"
    rows = [
        [name, mode, f[mode]["arrow_bytes_per_token"], f[mode]["ipc_bytes_per_token"]]
        for name, f in figures.items()
        for mode in ("potentials only", topk)
    ]
    text = table(["data", "mode", "Arrow B/token", "IPC B/token"], rows)
    text += f"\ntarget: potentials only <= {TARGETS['payload']:.0f} B per response token"
    worst = max(f["potentials only"]["arrow_bytes_per_token"] for f in figures.values())
    return {
        "datasets": figures,
        "batch_pairs": BATCH_PAIRS,
        "batches_per_dataset": n,
        "potentials_only_arrow_bytes_per_token": worst,
        "target_bytes_per_token": TARGETS["payload"],
    }, text


def trl_dpo(bench: Bench) -> dict:
    """TRL's DPOTrainer on the same student, pairs (same order), batch size, lengths and loss
    settings; per-step tokens/s between consecutive step ends, as tvkd-ray's trainer reports."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(THREADS)
    cfg = bench.config("trl", [])
    # Only the pairs it trains on: TRL precomputes reference log-probs for the whole dataset.
    pairs = bench.pairs().slice(0, bench.plan.steps * BATCH_PAIRS)
    dataset = Dataset.from_dict(
        {k: pairs.column(k).to_pylist() for k in ("prompt", "chosen", "rejected")}
    )

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

    clock = StepClock()
    args = DPOConfig(
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
    steps = sorted(clock.ends)
    rates, tokens = [], []
    previous_end, previous_tokens = clock.start, 0.0
    for step in steps:
        n = clock.tokens[step] - previous_tokens
        rates.append(n / (clock.ends[step] - previous_end))
        tokens.append(n)
        previous_end, previous_tokens = clock.ends[step], clock.tokens[step]
    keep = slice(bench.plan.warmup, None)
    return {
        "setup_and_precompute_s": setup_s,
        "steps": len(steps),
        "steps_measured": len(rates[keep]),
        "tokens_per_s": median(rates[keep]),
        "tokens_per_step": median(tokens[keep]),
    }


def suite_trl(bench: Bench) -> tuple[dict, str]:
    plan = bench.plan
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        reason = f"trl is not installed ({exc}); install the bench extra: pip install -e '.[bench]'"
        return {"status": "skipped", "reason": reason}, f"skipped: {reason}"
    # The trainer gets every core, as TRL and the bare loop do; the reference log-probs are
    # computed before training (teacher.cache=memory), as TRL's precompute_ref_log_probs does.
    cfg = bench.config(
        "dpo",
        [
            "run.stage=dpo",
            "teacher.cache=memory",
            "train.num_workers=1",
            f"train.num_cpus_per_worker={THREADS}",
            f"train.max_steps={plan.steps}",
        ],
    )
    batches = bench.batches()[: plan.steps]
    bare = bare_summary(
        bare_loop(
            bench, batches, threads=THREADS, teacher=False, alpha=0.0, precompute_reference=True
        ),
        plan.warmup,
    )
    trl_run = trl_dpo(bench)
    ray_run = fit_steady_state(bench, cfg)
    ratio = ray_run["tokens_per_s"] / trl_run["tokens_per_s"]
    results = {
        "mode": "run.stage=dpo (alpha = 0), reference log-probs precomputed by both",
        "settings": {
            "batch_pairs": BATCH_PAIRS,
            "steps": plan.steps,
            "warmup": plan.warmup,
            "threads": THREADS,
            "max_length": cfg.data.max_length,
        },
        "tvkd_ray": ray_run,
        "trl": trl_run,
        "bare_loop": bare,
        "ratio_tvkd_over_trl": ratio,
        "ratio_tvkd_over_bare": ray_run["tokens_per_s"] / bare["tokens_per_s"],
        "ratio_trl_over_bare": trl_run["tokens_per_s"] / bare["tokens_per_s"],
        "target_ratio": TARGETS["trl"],
    }
    rows = [
        [
            "tvkd-ray fit, run.stage=dpo",
            ray_run["tokens_per_s"],
            results["ratio_tvkd_over_bare"],
            ray_run["window_s"],
        ],
        [
            "TRL DPOTrainer, precompute_ref_log_probs",
            trl_run["tokens_per_s"],
            results["ratio_trl_over_bare"],
            trl_run["tokens_per_step"] / trl_run["tokens_per_s"],
        ],
        ["bare loop", bare["tokens_per_s"], 1.0, bare["total_s"]],
    ]
    text = table(["path", "tokens/s", "x bare", "s/step"], rows)
    text += f"\nratio tvkd-ray / TRL = {ratio:.2f} (target >= {TARGETS['trl']})"
    text += (
        f"\ntvkd-ray per step: {ray_run['step_s']:.3f} s in the step, "
        f"{ray_run['report_s']:.3f} s between steps (ray.train.report, MLflow)"
    )
    return results, text


def suite_scaling(bench: Bench) -> tuple[dict, str]:
    plan = bench.plan
    runs = {}
    for workers in (1, 2):
        cfg = bench.config(
            f"scaling{workers}",
            [
                "run.stage=dpo",
                "teacher.cache=memory",
                f"train.num_workers={workers}",
                "train.num_cpus_per_worker=1",
                f"train.max_steps={plan.steps}",
            ],
        )
        runs[workers] = fit_steady_state(bench, cfg)
    speedup = runs[2]["tokens_per_s"] / runs[1]["tokens_per_s"]
    results = {
        "mode": "run.stage=dpo (alpha = 0), reference precomputed (teacher.cache=memory)",
        "settings": {
            "batch_pairs_per_worker": BATCH_PAIRS,
            "cpus_per_worker": 1,
            "steps": plan.steps,
            "warmup": plan.warmup,
        },
        "runs": {str(k): v for k, v in runs.items()},
        "speedup_2_over_1": speedup,
    }
    rows = [
        [w, r["tokens_per_s"], r["step_s"], r["report_s"], r["wait_share"]] for w, r in runs.items()
    ]
    text = table(["workers", "tokens/s", "s in step", "s between steps", "wait share"], rows)
    text += f"\nspeed-up 2 workers / 1 = {speedup:.2f} (ideal 2.0 with a core per worker)"
    return results, text


SUITE_FUNCTIONS: dict[str, Callable[[Bench], tuple[dict, str]]] = {
    "pipeline": suite_pipeline,
    "teacher": suite_teacher,
    "payload": suite_payload,
    "trl": suite_trl,
    "scaling": suite_scaling,
}


# ------------------------------------------------------------------------------------- main


def parse_suites(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        listed = ", ".join(unknown) or "(none given)"
        raise argparse.ArgumentTypeError(
            f"unknown suite(s) {listed}; choose from {','.join(SUITES)}"
        )
    return names


def run_suite(name: str, bench: Bench, mode: str, command: str) -> dict:
    """Run one suite, print its table, and return its JSON record (an error is recorded, not
    raised, so the other suites still run)."""
    print(f"\n=== {name} ({mode}) ===", flush=True)
    started = datetime.datetime.now().astimezone()
    clock = time.perf_counter()
    record = {
        "suite": name,
        "mode": mode,
        "command": command,
        "plan": asdict(bench.plan),
        "machine": machine(),
    }
    try:
        results, text = SUITE_FUNCTIONS[name](bench)
        record["status"] = results.pop("status", "ok")
        record["results"] = results
        record["table"] = text
        print(text, flush=True)
    except Exception as exc:
        traceback.print_exc()
        record["status"] = "error"
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    busy = max(record["machine"]["load_average_1_5_15"][0], record["load_average_1min_end"])
    if busy > BUSY_LOAD * (os.cpu_count() or 1):
        record["warning"] = (
            f"load average reached {busy:.1f} on {os.cpu_count()} CPUs: other work shared "
            "the machine, so the timings of this suite are unreliable"
        )
        print(f"warning: {record['warning']}", flush=True)
    record["started"] = started.isoformat(timespec="seconds")
    record["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record["wall_s"] = round(time.perf_counter() - clock, 1)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and cases (minutes)")
    parser.add_argument(
        "--suites",
        type=parse_suites,
        default=list(SUITES),
        help=f"comma-separated: {','.join(SUITES)}",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path("bench-results"), help="JSON and MLflow store here"
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory(prefix="tvkd-bench-") as scratch:
        bench = Bench(QUICK if args.quick else FULL, args.out_dir, Path(scratch))
        for name in args.suites:
            record = run_suite(name, bench, mode, command)
            path = args.out_dir / f"{name}.json"
            path.write_text(json.dumps(record, indent=1, default=str) + "\n")
            print(f"[{name}: {record['status']}, {record['wall_s']:.0f} s -> {path}]", flush=True)
            records.append(record)
    # The Ray runs stream their workers' logs to this output: the tables again, together.
    print(f"\n=== summary ({mode}, {time.perf_counter() - started:.0f} s) ===")
    for record in records:
        print(f"\n--- {record['suite']}: {record['status']}")
        print(record.get("table") or record.get("error", ""))
        if "warning" in record:
            print(f"warning: {record['warning']}")
    failed = [r["suite"] for r in records if r["status"] == "error"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
