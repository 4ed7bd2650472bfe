"""Benchmarks of SPEC §7, each ratio measured side by side in one run on one machine.

    .venv/bin/python jobs/bench.py [--quick] [--out-dir bench-results]
        [--suites pipeline,teacher,payload,trl,scaling,students,tokenizers]

Suites (all use config-built Llama models with the SmolLM2 tokenizer's 49,152-token vocabulary:
teacher 8 layers x 256, student 4 layers x 256; the bundled dataset; fp32 on CPU), one module
each in ``jobs/benchmarks/``:

* ``pipeline``: steady-state tokens/s of ``tvkd_ray.fit`` (teacher pool -> reference pool -> one
  Ray Train worker, ``teacher.cache=none`` and ``reference.cache=none`` so both pools stream every
  batch, on data long enough that the teacher still streams at the last measured step) over a
  bare single-process loop doing the same teacher, reference and student work on the same
  batches (the actor classes as plain objects, then the trainer's ``StudentStep``);
  the share of step time the trainer waits for data; per-stage costs to show where time goes.
* ``teacher``: peak RSS growth and time of the chunked potentials vs full logits, several sizes.
* ``payload``: Arrow bytes per response token the teacher adds (Φ only, and with top-32).
* ``trl``: DPO mode (α = 0) of tvkd-ray vs TRL's ``DPOTrainer`` with precomputed reference
  log-probs, same model, data, batch size and lengths; the bare loop for reference.
* ``scaling``: DPO-mode tokens/s with 1, 2 and 4 Ray Train workers (one CPU each).
* ``students``: seconds per optimiser step, in this process, of full fine-tuning and LoRA, each
  with and without gradient checkpointing, and of LoRA with the reference scored in the trainer
  (adapters off) instead of by the reference actors.
* ``tokenizers``: the teacher actor's seconds per batch with a student of its own tokenizer and
  with the tiny preset's (potentials mapped by character offsets), alternated batch by batch, and
  the mapped payload per student response token.

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
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

# Runs as a script from a checkout: the repository for the packages, this folder for the suites
# (jobs/benchmarks) and measure_teacher, whose payload and memory measurements they reuse.
JOBS = Path(__file__).resolve().parent
sys.path[:0] = [str(JOBS.parent), str(JOBS)]

from tvkd_ray import runtime  # noqa: E402  (imports neither ray nor transformers)

# Before Ray or transformers are imported: offline models, no auth prompt or usage reporting on
# the private local cluster that fit() starts (SPEC §9); no progress bars between the tables.
runtime.set_defaults({**runtime.PRIVATE_CLUSTER_ENV, "TQDM_DISABLE": "1"})

# The single-process baselines (bare loop, TRL) run with the allocator settings fit() gives its
# Ray processes, so the ratios compare frameworks, not mallocs; glibc reads them at start-up.
if any(os.environ.get(key) != value for key, value in runtime.ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **runtime.ALLOCATOR_ENV})

from benchmarks import payload, pipeline, scaling, students, teacher, tokenizers, trl  # noqa: E402
from benchmarks.common import BUSY_LOAD, FULL, QUICK, Bench  # noqa: E402
from benchmarks.report import machine  # noqa: E402

SUITE_FUNCTIONS = {
    "pipeline": pipeline.run,
    "teacher": teacher.run,
    "payload": payload.run,
    "trl": trl.run,
    "scaling": scaling.run,
    "students": students.run,
    "tokenizers": tokenizers.run,
}
SUITES = tuple(SUITE_FUNCTIONS)


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


def parse_args() -> argparse.Namespace:
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
    return parser.parse_args()


def print_summary(records: list[dict], mode: str, seconds: float) -> None:
    """The Ray runs stream their workers' logs to this output: the tables again, together."""
    print(f"\n=== summary ({mode}, {seconds:.0f} s) ===")
    for record in records:
        print(f"\n--- {record['suite']}: {record['status']}")
        print(record.get("table") or record.get("error", ""))
        if "warning" in record:
            print(f"warning: {record['warning']}")


def main() -> int:
    args = parse_args()
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
    print_summary(records, mode, time.perf_counter() - started)
    failed = [r["suite"] for r in records if r["status"] == "error"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
