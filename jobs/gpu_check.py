"""The prepared GPU check (SPEC §7): one short script, as is, on a machine with one CUDA GPU.

    .venv/bin/python jobs/gpu_check.py [--out-dir gpu-check] [--steps 40]
    .venv/bin/python jobs/gpu_check.py --dry     # the same steps on CPU with the tiny models

1. ``potentials``: the teacher actor (a Ray actor, as the pools run it) scores one batch with
   bf16 weights on CUDA, with fp32 weights on CUDA and with fp32 weights on CPU; the largest
   differences of Φ from the CPU fp32 values, absolute and relative to |Φ|.
2. ``runs``: short runs on the one GPU, shared by fractions: the trainer worker (0.5 GPU) beside
   the teacher and reference actors (0.25 each). ``tvkd``, ``dpo`` (the same run without the
   teacher) and ``lora`` (LoRA adapters with gradient checkpointing). For each: wall time, the
   step-0 eval margin (exactly 0: the reference computes as the student), tokens/s of teacher,
   reference and student; and TVKD over DPO wall time.

FSDP needs two ranks on two devices (NCCL refuses two ranks on one GPU), so it is not here: the
CPU tests run it over two gloo workers. The SmolLM2-135M-Instruct teacher and its 6-layer student
(the default run's models) on the bundled data; under 8 minutes on one H200-class GPU. Writes
``<out-dir>/gpu_check.json`` and prints a table. ``--dry`` (CPU, tiny models, 2 steps) keeps the
script from rotting: the tests run it (without the lora run, which other tests train).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvkd_ray import runtime  # noqa: E402  (imports neither ray nor transformers)

runtime.set_defaults({**runtime.PRIVATE_CLUSTER_ENV, "TQDM_DISABLE": "1"})

REPO = Path(__file__).resolve().parents[1]
# The GPU shares of the runs: the worker and both pools on the one device.
SHARES = ["train.use_gpu=true", "train.resources_per_worker={GPU: 0.5}"]
SHARES += [f"{pool}.num_gpus_per_actor=0.25" for pool in ("teacher", "reference")]
RUNS = {
    "tvkd": [],
    "dpo": ["run.stage=dpo"],
    "lora": ["student.lora.r=16", "train.gradient_checkpointing=true"],
}


def base_overrides(dry: bool, out_dir: Path, steps: int) -> list[str]:
    common = [
        f"run.output_dir={out_dir / 'runs'}",
        f"train.max_steps={steps}",
        "train.eval_every=0",
        f"tracking.uri=sqlite:///{out_dir / 'mlflow.db'}",
    ]
    if dry:  # the tiny models of the tests on a slice of the bundled pairs, on CPU
        tiny = [
            "student.model=tiny-student",
            "student.num_layers=null",
            "teacher.model=tiny-teacher",
        ]
        return [*common, *tiny, *dry_data(out_dir), "train.num_cpus_per_worker=0.5"]
    return [*common, *SHARES]


def dry_data(out_dir: Path, pairs: int = 24) -> list[str]:
    """The first ``pairs`` bundled pairs for training and for evaluation."""
    from tvkd_ray.config import BUNDLED_DATA

    overrides = []
    for split in ("train", "eval"):
        lines = (BUNDLED_DATA / f"{split}.jsonl").read_text().splitlines(keepends=True)
        path = out_dir / f"dry_{split}.jsonl"
        path.write_text("".join(lines[:pairs]))
        overrides.append(f"data.{split}_path={path}")
    return overrides


def teacher_batch(cfg, pairs: int = 16):
    """One batch of the bundled pairs, tokenised as the pools receive them."""
    from driver.inputs import check_tokenizers, load_data
    from tvkd_ray.data import tokenize_batch

    tokenizers = check_tokenizers(cfg)
    tokenizer = tokenizers.student
    table = load_data(cfg, tokenizers).train.slice(0, pairs)
    data = cfg.data
    return tokenize_batch(
        table, tokenizer, max_length=data.max_length, max_prompt_length=data.max_prompt_length
    )


def potentials(cfg, dry: bool) -> dict:
    """Φ of one batch on the accelerator (bf16 and fp32 weights) against CPU fp32."""
    import numpy as np
    import ray

    from actors.teacher import TeacherPotentials, TeacherSpec
    from tvkd_ray import schema
    from tvkd_ray.models import resolve_model

    table = teacher_batch(cfg)
    gpus = 0.0 if dry else 0.5
    spec = TeacherSpec(resolve_model(cfg.teacher.model), autocast="none")
    variants = {"cpu_fp32": (0.0, "float32"), "gpu_fp32": (gpus, "float32")}
    variants["gpu_bf16"] = (gpus, "bfloat16")
    phi = {}
    for name, (num_gpus, dtype) in variants.items():
        actor = ray.remote(TeacherPotentials).options(num_gpus=num_gpus, num_cpus=1)
        handle = actor.remote(dataclasses.replace(spec, num_gpus=num_gpus, dtype=dtype))
        out = ray.get(handle.__call__.remote(table))
        ray.kill(handle)
        columns = [out.column(c).to_numpy(zero_copy_only=False) for c in schema.POTENTIALS]
        phi[name] = np.concatenate([np.concatenate(rows) for rows in columns])
    reference = phi["cpu_fp32"]
    report = {"tokens": int(reference.size), "phi_abs_max": float(np.abs(reference).max())}
    for name in ("gpu_fp32", "gpu_bf16"):
        diff = np.abs(phi[name] - reference)
        report[f"{name}_max_abs_diff"] = float(diff.max())
        report[f"{name}_max_rel_diff"] = float((diff / np.maximum(np.abs(reference), 1.0)).max())
    return report


def run(name: str, overrides: list[str]) -> dict:
    """One short fit: wall time, the step-0 eval margin and the three stages' tokens/s."""
    import mlflow

    import tvkd_ray
    from tvkd_ray.config import load_config

    cfg = load_config(REPO / "examples" / "default.yaml", [*overrides, f"run.name={name}"])
    started = time.perf_counter()
    result = tvkd_ray.fit(cfg)
    wall = time.perf_counter() - started
    client = mlflow.MlflowClient(result.tracking_uri)
    history = client.get_metric_history(result.mlflow_run_id, "eval/rewards/margins")
    metrics = result.metrics
    return {
        "wall_s": wall,
        "step0_eval_margin": next((m.value for m in history if m.step == 0), None),
        "student_tokens_per_s": metrics.get("perf/tokens_per_s"),
        "teacher_tokens_per_s": metrics.get("perf/teacher_tokens_per_s"),
        "reference_tokens_per_s": metrics.get("perf/reference_tokens_per_s"),
        "final_loss": metrics.get("loss"),
        "mlflow_run_id": result.mlflow_run_id,
    }


def device_name(dry: bool) -> str:
    import torch

    if dry or not torch.cuda.is_available():
        return "cpu (dry run)"
    return torch.cuda.get_device_name(0)


def table(report: dict) -> str:
    phi = report["potentials"]
    lines = [
        f"device: {report['device']}",
        f"potentials over {phi['tokens']} tokens (|phi| up to {phi['phi_abs_max']:.3g}):",
        f"  gpu fp32 vs cpu fp32: max |diff| {phi['gpu_fp32_max_abs_diff']:.3g}"
        f" (rel {phi['gpu_fp32_max_rel_diff']:.3g})",
        f"  gpu bf16 vs cpu fp32: max |diff| {phi['gpu_bf16_max_abs_diff']:.3g}"
        f" (rel {phi['gpu_bf16_max_rel_diff']:.3g})",
        "run    wall s  step-0 margin  student tok/s  teacher tok/s  reference tok/s",
    ]
    for name, r in report["runs"].items():
        rates = [r[f"{role}_tokens_per_s"] for role in ("student", "teacher", "reference")]
        shown = "  ".join(f"{rate:13.0f}" if rate else f"{'-':>13}" for rate in rates)
        lines.append(f"{name:<6} {r['wall_s']:6.1f}  {r['step0_eval_margin']!s:>13}  {shown}")
    lines.append(f"TVKD / DPO wall time: {report['tvkd_over_dpo_wall']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU and tiny models (the tests)")
    parser.add_argument("--out-dir", default="gpu-check", help="where the JSON and runs go")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (40; dry: 2)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = args.steps or (2 if args.dry else 40)

    import ray

    from tvkd_ray.config import load_config

    overrides = base_overrides(args.dry, out_dir, steps)
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    report = {"device": device_name(args.dry), "steps": steps, "overrides": overrides}
    cfg = load_config(REPO / "examples" / "default.yaml", overrides)
    report["potentials"] = potentials(cfg, args.dry)
    # Dry, LoRA is left out to save the tests a minute (test_bigger_models_on_cpu trains it).
    chosen = {name: extra for name, extra in RUNS.items() if not (args.dry and name == "lora")}
    report["runs"] = runs = {
        name: run(name, [*overrides, *extra]) for name, extra in chosen.items()
    }
    report["tvkd_over_dpo_wall"] = runs["tvkd"]["wall_s"] / runs["dpo"]["wall_s"]
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(table(report), flush=True)
    return report


if __name__ == "__main__":
    main()
