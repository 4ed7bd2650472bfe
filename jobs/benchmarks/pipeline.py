"""``pipeline``: steady-state tokens/s of ``tvkd_ray.fit`` (teacher pool -> reference pool -> one
Ray Train worker, both pools streaming every batch, on data long enough that the teacher still
streams at the last measured step) over the bare single-process loop doing the same teacher,
reference and student work on the same batches; the share of step time the trainer waits for
data; per-stage costs to show where time goes."""

from __future__ import annotations

from actors.reference import ReferenceLogps
from actors.teacher import TeacherPotentials
from benchmarks.bare import bare_loop, bare_summary
from benchmarks.common import (
    BATCH_PAIRS,
    STUDENT_SHAPE,
    TARGETS,
    TEACHER_SHAPE,
    THREADS,
    Bench,
    Plan,
)
from benchmarks.fit_history import fit_steady_state
from benchmarks.report import median, table
from tvkd_ray.config import TVKDConfig

STAGES = ("teacher", "reference", "student")
# The Ray Data operators of the pools, named after their actor classes, by stage.
OPERATORS = {"teacher": TeacherPotentials.__name__, "reference": ReferenceLogps.__name__}


def run(bench: Bench) -> tuple[dict, str]:
    plan = bench.plan
    stream = bench.batches("stream")
    cfg = bench.config(
        "pipeline",
        [
            "run.stage=tvkd",
            # No cache for either pool: both stream every batch beside the trainer.
            "teacher.cache=none",
            "reference.cache=none",
            "train.num_workers=1",
            f"train.max_steps={plan.steps}",
        ],
        "stream",
    )
    runs = measure(bench, cfg, stream[: plan.steps])
    return results(plan, cfg, runs, len(stream)), text(runs, len(stream))


def measure(bench: Bench, cfg: TVKDConfig, batches: list) -> dict:
    """The Ray run, the bare-loop rounds around it and the one-thread stage profile."""
    plan = bench.plan
    bare_rounds = []

    def bare_round() -> None:
        records = bare_loop(bench, batches, cfg, threads=THREADS)
        bare_rounds.append(bare_summary(records, plan.warmup))

    # Baseline rounds around the Ray run (full mode) expose drift in the machine's load.
    bare_round()
    ray_run = fit_steady_state(bench, cfg)
    for _ in range(plan.bare_rounds - 1):
        bare_round()
    # The stages alone at one thread, as each pipeline process runs them (one CPU each): the
    # pipeline overlaps them across processes, so the slowest one bounds its throughput.
    profile = bare_summary(
        bare_loop(bench, batches[: plan.profile_batches + 1], cfg, threads=1), warmup=1
    )
    return {"ray": ray_run, "bare_rounds": bare_rounds, "profile": profile}


def results(plan: Plan, cfg: TVKDConfig, runs: dict, data_batches: int) -> dict:
    ray_run, bare_rounds, profile = runs["ray"], runs["bare_rounds"], runs["profile"]
    bare_rate = median([r["tokens_per_s"] for r in bare_rounds])
    teacher_batches = ray_run["ray_data_operators"].get(OPERATORS["teacher"], {}).get("batches")
    return {
        "models": {"teacher": TEACHER_SHAPE, "student": STUDENT_SHAPE, "vocab": 49152},
        "settings": {
            "batch_pairs": BATCH_PAIRS,
            "steps": plan.steps,
            "warmup_steps_dropped": plan.warmup,
            "teacher_cache": cfg.teacher.cache,
            "reference_cache": cfg.reference.cache,
            "data_batches": data_batches,
            "threads_bare_loop": THREADS,
            "cpus_pipeline": {
                "teacher": cfg.teacher.num_cpus_per_actor,
                "reference": cfg.reference.num_cpus_per_actor,
                "trainer": cfg.train.num_cpus_per_worker,
            },
            "bare_loop_potentials": "TeacherPotentials (soft_value_from_hidden: chunked, "
            "response positions only)",
        },
        "pipeline": ray_run,
        # Whether the teacher was still streaming at the last step, rather than done with the
        # data and out of the trainer's way (unknown when Ray Data's log format changed).
        "streamed_throughout": None if teacher_batches is None else teacher_batches < data_batches,
        "bare_loop_rounds": bare_rounds,
        "bare_loop_tokens_per_s": bare_rate,
        "ratio": ray_run["tokens_per_s"] / bare_rate,
        "target_ratio": TARGETS["pipeline"],
        "wait_share": ray_run["wait_share"],
        "target_wait_share": TARGETS["wait_share"],
        "stage_profile_1_thread": profile,
        "ratio_vs_bare_1_thread": ray_run["tokens_per_s"] / profile["tokens_per_s"],
    }


def text(runs: dict, data_batches: int) -> str:
    ray_run, bare_rounds, profile = runs["ray"], runs["bare_rounds"], runs["profile"]
    ratio = ray_run["tokens_per_s"] / median([r["tokens_per_s"] for r in bare_rounds])
    rows = [
        ["TVKD pipeline (fit, 1 worker)", ray_run["tokens_per_s"], ray_run["window_s"]],
        *[
            [
                f"bare loop, {THREADS} threads, round {i + 1}",
                r["tokens_per_s"],
                r["seconds"]["total"],
            ]
            for i, r in enumerate(bare_rounds)
        ],
        # Threads of one process stall each other when other work takes the cores; one thread
        # per process, as in the pipeline, is the comparison that survives a busy machine.
        [
            "bare loop, 1 thread (stage profile)",
            profile["tokens_per_s"],
            profile["seconds"]["total"],
        ],
    ]
    out = table(["path", "tokens/s", "s/step"], rows)
    out += f"\nratio pipeline / bare = {ratio:.2f} (target >= {TARGETS['pipeline']})"
    out += (
        f"\nwait_teacher share of step time = {ray_run['wait_share']:.1%} "
        f"(target <= {TARGETS['wait_share']:.0%})\n\n"
    )
    stage_rows = stage_table_rows(runs, data_batches)
    return out + table(["where the time goes (per step / batch)", "statistic", "s"], stage_rows)


def stage_table_rows(runs: dict, data_batches: int) -> list[list]:
    """Where the time goes: the trainer's step, each actor pool, each stage alone."""
    ray_run, bare_rounds, profile = runs["ray"], runs["bare_rounds"], runs["profile"]
    rows = [
        ["trainer: step (incl. wait)", "median s", ray_run["step_s"]],
        ["trainer: waiting for data", "median s", ray_run["wait_s"]],
        ["trainer: between steps (report, MLflow)", "median s", ray_run["report_s"]],
    ]
    for stage, name in OPERATORS.items():
        op = ray_run["ray_data_operators"].get(name)
        if op:
            label = f"{stage} actor ({op['batches']} of {data_batches} batches run)"
            rows.append([label, "mean s/batch", op["udf_s_per_batch"]])
    rows += [[f"alone, 1 thread: {s}", "median s", profile["seconds"][s]] for s in STAGES]
    bare = bare_rounds[0]["seconds"]
    rows += [[f"bare loop, {THREADS} threads: {s}", "median s", bare[s]] for s in STAGES]
    return rows
