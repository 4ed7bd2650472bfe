"""Every runnable example as its user runs it, in its smallest setting: real subprocesses, each
starting its own Ray. Marked `examples` (`make examples`), outside plain `pytest` (minutes each).

The stage configs run in a home of their own, so that their `~/tvkd-ray-outputs/...` paths, by
which stage 3 finds the models of stages 1 and 2, are exercised exactly as written; the model
presets come from the usual cache.
"""

import gzip
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from support import clean_env, error_lines

from tvkd_ray.models import cache_dir

REPO = Path(__file__).resolve().parents[1]
HH_PAIRS = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
PIPELINE = REPO / "examples" / "ray_data_pipeline.py"
STAGES = ("teacher_dpo", "student_sft", "student_tvkd")  # README order: each uses the last's output

pytestmark = pytest.mark.examples


def run(args: list[str], env: dict | None = None, timeout: float = 900):
    return subprocess.run(
        [sys.executable, *args],
        env=env or clean_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_ray_data_pipeline_trains_then_scores_held_out_pairs(tmp_path):
    proc = run([str(PIPELINE), f"run.output_dir={tmp_path}", "train.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Its pools were shared out to fit the machine-sized cluster it started.
    assert "CPU shares: train workers" in proc.stdout
    assert "held-out pairs where the student prefers the chosen reply: " in proc.stdout
    assert (tmp_path / "ray-data-pipeline" / "model" / "model.safetensors").exists()


def test_ray_data_pipeline_bad_input_is_one_error_line(tmp_path):
    proc = run([str(PIPELINE), f"run.output_dir={tmp_path}", "train.max_stepz=2"])
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(error_lines(proc)) == 1 and "train.max_stepz" in error_lines(proc)[0]
    assert "Traceback" not in proc.stderr


def test_stage_configs_run_in_order(tmp_path):
    pairs = tmp_path / "pairs.jsonl"  # 60 of the shared HH pairs: one held out, a few trained
    with gzip.open(HH_PAIRS, "rt") as source:
        pairs.write_text("".join(itertools.islice(source, 60)))
    home = tmp_path / "home"
    env = clean_env(HOME=str(home), TVKD_CACHE_DIR=str(cache_dir()))
    smallest = ["--data.train_path", str(pairs), "--train.max_steps", "2"]
    smallest += ["--data.max_length", "64", "--data.max_prompt_length", "32"]
    for stage in STAGES:
        proc = run(["jobs/tvkd.py", "--config", f"examples/{stage}.yaml", *smallest], env)
        assert proc.returncode == 0, f"{stage}: {proc.stderr[-4000:]}"
    outputs = home / "tvkd-ray-outputs"
    for name in ("teacher-dpo", "student-sft", "student-tvkd"):
        assert (outputs / name / "model" / "model.safetensors").exists(), name


def test_cross_tokenizer_config_trains(tmp_path):
    """The SmolLM2 teacher with the tiny student's own tokenizer (SPEC §2.3c), as documented."""
    import mlflow

    proc = run(
        [
            "jobs/tvkd.py",
            "--config",
            "examples/cross_tokenizer.yaml",
            "--run.output_dir",
            str(tmp_path),
            "--train.max_steps",
            "2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "its potentials are mapped to the student's tokens" in proc.stdout
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run_info,) = client.search_runs([client.get_experiment_by_name("tvkd-ray").experiment_id])
    assert run_info.data.tags["tvkd.tokenizer_mapping"] == "char_offsets"
    assert run_info.data.metrics["tvkd/potential_mean"] != 0.0
