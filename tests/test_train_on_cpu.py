"""End-to-end training on real Ray Train runs (few fits: each costs ~1 min here).

* the Python API with 2 workers and a teacher pool, a worker killed mid-run, MLflow read back;
* the CLI stopped from outside (SIGTERM) after a checkpoint and rerun: it resumes and ends where
  an uninterrupted run ends.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from support import CLI, clean_env

from tvkd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "tvkd/shaping_chosen",
    "tvkd/shaping_rejected",
    "tvkd/shaped_margins",
    "tvkd/shaped_accuracies",
    "tvkd/potential_mean",
    "grad_norm",
    "learning_rate",
    "epoch",
    "num_tokens",
    "perf/tokens_per_s",
    "perf/pairs_per_s",
    "timing_s/step",
    "timing_s/wait_teacher",
    "perf/teacher_bytes_per_token",
    "eval/loss",
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/tvkd/shaped_margins",
]

pytestmark = pytest.mark.slow


def _write_pairs(path: Path, n: int, offset: int = 0) -> Path:
    """Standard-format arithmetic pairs (correct vs off-by-one answers)."""
    with open(path, "w") as f:
        for i in range(offset, offset + n):
            a, b = i % 9 + 1, i // 9 + 2
            f.write(
                json.dumps(
                    {
                        "prompt": f"User: What is {a} plus {b}?\nAssistant:",
                        "chosen": f" {a} + {b} = {a + b}.",
                        "rejected": f" {a} + {b} = {a + b + 1}.",
                    }
                )
                + "\n"
            )
    return path


def _client(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(uri)


@pytest.mark.faults
def test_fit_api_two_workers_survives_a_dead_worker(ray_cluster, arm_fault, tmp_path):
    """fit() through the API: 2 Ray Train workers, a teacher pool, an eval set of one block
    (one worker's eval shard is empty), a worker killed after the step-5 update; the run
    recovers from its last checkpoint, trains every pair exactly once per epoch, scores every
    eval pair once per evaluation, logs the SPEC §2.5 metrics to one MLflow run and saves a
    loadable model."""
    import tvkd_ray

    train = _write_pairs(tmp_path / "train.jsonl", 40)
    evalp = _write_pairs(tmp_path / "eval.jsonl", 3, offset=100)
    cfg = load_config(
        TINY,
        [
            f"run.output_dir={tmp_path / 'out'}",
            "run.name=api",
            f"data.train_path={train}",
            f"data.eval_path={evalp}",
            "train.num_workers=2",
            "train.batch_size=4",
            "train.epochs=2",
            "train.max_steps=null",
            "train.save_every=2",
            "train.eval_every=5",
            "train.max_failures=1",
            "train.num_cpus_per_worker=0.5",
        ],
    )
    marker = arm_fault("trainer", 5)  # 40 pairs / (2 workers x 4) = 5 steps per epoch
    result = tvkd_ray.fit(cfg)

    assert marker.exists(), "the worker fault did not fire"
    run_dir = Path(result.run_dir)
    for epoch in (0, 1):
        ids = np.load(run_dir / "pairs_seen" / f"epoch{epoch}.npy")
        assert sorted(ids.tolist()) == list(range(40)), f"epoch {epoch}: {sorted(ids.tolist())}"
    # Shards are uneven (no pair is dropped), so an epoch takes 5 or 6 steps.
    final_step = int(result.metrics["step"])
    assert 10 <= final_step <= 12

    client = _client(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tvkd-ray").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    # The step-4 checkpoint may still be registering when the worker dies at step 5.
    assert run.data.tags["tvkd.resumed_from_step"] in ("2", "4")
    missing = [m for m in METRICS if m not in run.data.metrics]
    assert not missing, missing
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, final_step + 1))
    assert run.data.params["loss.alpha"] == "0.5"
    evaluated = client.get_metric_history(run.info.run_id, "eval/num_pairs")
    assert {m.value for m in evaluated} == {3.0} and len(evaluated) >= 3  # step 0, 5, end
    # Step 0: the policy is the reference, every margin a tie, so no pair is a win.
    accuracy = client.get_metric_history(run.info.run_id, "eval/rewards/accuracies")
    assert [m.value for m in accuracy if m.step == 0] == [0.0]
    assert run.data.metrics["perf/teacher_bytes_per_token"] <= 8
    assert all(np.isfinite(v) for v in run.data.metrics.values())
    _check_run_story(client, run, train_pairs=40, eval_pairs=3)

    from transformers import AutoModelForCausalLM

    model_dir = Path(result.model_dir)
    assert (model_dir / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.num_hidden_layers == 2


def _check_run_story(client, run, train_pairs: int, eval_pairs: int) -> None:
    """What the MLflow UI shows of a finished TVKD run: every metric in a TRL name or a group,
    the datasets with their row counts, the shaping picture, the student as a logged model
    (transformers flavour), description, source and duration, the experiment's model-training
    mode."""
    groups = {"rewards", "logps", "tvkd", "perf", "timing_s", "data", "eval"}
    trl = {"loss", "grad_norm", "learning_rate", "num_tokens", "epoch"}
    loose = [m for m in run.data.metrics if m not in trl and m.split("/")[0] not in groups]
    assert not loose, loose
    assert not [m for m in run.data.metrics if m.startswith("eval/") and m.endswith("_s")]
    rows = {
        tag.value: json.loads(d.dataset.profile)["num_rows"]
        for d in run.inputs.dataset_inputs
        for tag in d.tags
        if tag.key == "mlflow.data.context"
    }
    assert rows == {"training": train_pairs, "eval": eval_pairs}
    assert "shaping_terms.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.status == "READY" and model.source_run_id == run.info.run_id
    files = [a.path for a in client.list_logged_model_artifacts(model.model_id)]
    assert "MLmodel" in files, files
    mlmodel = mlflow.artifacts.download_artifacts(f"{model.artifact_location}/MLmodel")
    flavors = yaml.safe_load(Path(mlmodel).read_text())["flavors"]
    assert flavors["transformers"]["task"] == "text-generation" and "python_function" in flavors
    tags = run.data.tags
    assert tags["mlflow.note.content"].startswith("**TVKD**")
    assert (
        "potential Φ: bounded `soft_value` of the log-probabilities (q = 0.7, τ = 1.0, "
        "top-50 + rest)" in tags["mlflow.note.content"]
    )
    assert tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert tags["tvkd.potential"] == "soft_value" and tags["tvkd.alpha_one_minus_gamma"] == "0.05"
    assert run.info.end_time >= run.info.start_time > 0
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def _cli(args: list[str], env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(CLI), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


@pytest.mark.e2e  # four runs, three with their own cluster
@pytest.mark.faults
def test_cli_stopped_by_sigterm_resumes_and_matches_uninterrupted(ray_cluster, tmp_path):
    import tvkd_ray

    train = _write_pairs(tmp_path / "train.jsonl", 48)
    evalp = _write_pairs(tmp_path / "eval.jsonl", 8, offset=100)
    common = [
        f"run.output_dir={tmp_path / 'out'}",
        f"data.train_path={train}",
        f"data.eval_path={evalp}",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.save_every=3",
    ]
    # The uninterrupted reference run, in-process on the test cluster.
    baseline = tvkd_ray.fit(load_config(TINY, [*common, "run.name=straight"]))

    marker = tmp_path / "hang-fired"
    env = clean_env(TVKD_FAULT=f"trainer:4:{marker}:hang")  # its own cluster, its own fault
    args = ["--config", str(TINY), *[f"--{o}" for o in common], "--run.name", "stopped"]
    first = _cli(args, env)
    deadline = time.time() + 400
    while not marker.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert marker.exists(), first.communicate()[0][-3000:]
    os.kill(first.pid, signal.SIGTERM)  # to the driver, as a scheduler would
    try:
        out, _ = first.communicate(timeout=120)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # whatever is left of its private cluster
        except ProcessLookupError:
            pass
    assert first.returncode != 0
    run_dir = tmp_path / "out" / "stopped"
    run_id = (run_dir / "mlflow_run_id").read_text()

    second = _cli(args, env)
    out, _ = second.communicate(timeout=500)
    assert second.returncode == 0, out[-3000:]
    assert (run_dir / "mlflow_run_id").read_text() == run_id

    client = _client(baseline.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags["tvkd.resumed_from_step"] == "3"
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 6
    straight = client.get_run(baseline.mlflow_run_id).data.metrics
    for key in ("loss", "eval/loss", "eval/rewards/margins"):
        assert abs(run.data.metrics[key] - straight[key]) < 1e-4, key
    assert (
        sum(r.info.run_name == "stopped" for r in client.search_runs([run.info.experiment_id])) == 1
    )

    # Once finished, the same command only says so: no cluster, no model or teacher work.
    started = time.monotonic()
    third = _cli(args, env)
    out, _ = third.communicate(timeout=120)
    assert third.returncode == 0, out[-3000:]
    assert "already finished" in out and str(run_dir / "model") in out, out[-3000:]
    assert "[tvkd] run " not in out and time.monotonic() - started < 60
    assert client.get_run(run_id).data.metrics == run.data.metrics
