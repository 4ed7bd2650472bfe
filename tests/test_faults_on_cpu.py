"""Fault campaign pieces that need no full training run of their own (SPEC §8).

The campaign as a whole is ``pytest -m faults``: a dead teacher actor (test_pipeline_on_cpu), a
dead training worker and a SIGTERM'd driver (test_train_on_cpu), resources the cluster lacks, a
corrupted checkpoint, MLflow failures and non-finite teacher outputs (here).
"""

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from support import error_lines, free_port, mlflow_server, run_cli

from actors.lockstep import drop_nonfinite
from actors.teacher import TeacherPotentials, TeacherSpec
from tvkd_ray import schema
from tvkd_ray.config import load_config
from tvkd_ray.data import tokenize_batch
from tvkd_ray.errors import DataError
from tvkd_ray.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def nan_teacher(tmp_path_factory) -> str:
    """tiny-teacher whose input embedding of the byte-level token 'z' is NaN: every pair
    mentioning a zebra gets non-finite potentials, the others (no 'z' anywhere) stay finite."""
    model = load_model("tiny-teacher")
    tokenizer = load_tokenizer("tiny-teacher")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    zebra = tokenizer.convert_tokens_to_ids("z")
    with torch.no_grad():
        model.get_input_embeddings().weight[zebra] = float("nan")
    out = tmp_path_factory.mktemp("nan-teacher")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _pairs(mentions_zebra: list[bool]) -> pa.Table:
    tokenizer = load_tokenizer("tiny-teacher")
    rows = {
        "pair_id": pa.array(range(len(mentions_zebra)), pa.int64()),
        "prompt": [f"Q{i}: name an animal." for i in range(len(mentions_zebra))],
        "chosen": [" a zebra" if z else " a horse" for z in mentions_zebra],
        "rejected": [" a rock" for _ in mentions_zebra],
    }
    return tokenize_batch(pa.table(rows), tokenizer, max_length=64, max_prompt_length=32)


def test_nonfinite_teacher_potentials_are_named_or_skipped(nan_teacher):
    mentions = [False, True, False, False, True, False]
    scored = TeacherPotentials(TeacherSpec(nan_teacher))(_pairs(mentions))
    with pytest.raises(DataError, match=r"not finite for pair_id 1, 4;"):
        drop_nonfinite(scored, "error")
    kept, dropped = drop_nonfinite(scored, "skip")
    assert dropped == 2
    assert kept.column("pair_id").to_pylist() == [0, 2, 3, 5]
    for name in (schema.CHOSEN_POTENTIALS, schema.REJECTED_POTENTIALS):
        values = np.concatenate(kept.column(name).to_numpy(zero_copy_only=False))
        assert np.isfinite(values).all()


def test_nonfinite_reference_logps_are_caught_too():
    table = pa.table(
        {
            "pair_id": pa.array([7, 8], pa.int64()),
            schema.REF_CHOSEN_LOGPS: pa.array([-3.0, float("-inf")], pa.float32()),
            schema.REF_REJECTED_LOGPS: pa.array([-4.0, -2.0], pa.float32()),
        }
    )
    with pytest.raises(DataError, match="pair_id 8;"):
        drop_nonfinite(table, "error")
    kept, dropped = drop_nonfinite(table, "skip")
    assert dropped == 1 and kept.column("pair_id").to_pylist() == [7]


def test_unreachable_tracking_server_fails_before_model_work(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.time()
    proc = run_cli("--config", str(TINY), "--run.output_dir", str(tmp_path), "--tracking.uri", uri)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = error_lines(proc)
    assert len(errors) == 1 and f"tracking.uri: MLflow server {uri} is unreachable" in errors[0]
    assert not (tmp_path / "tiny" / "student_init").exists()  # no model work happened
    assert time.time() - start < 60


def test_more_gpus_than_the_cluster_has_is_a_clear_error_not_a_hang(tmp_path):
    start = time.time()
    proc = run_cli(
        "--config",
        str(TINY),
        "--run.output_dir",
        str(tmp_path),
        "--tracking.enabled",
        "false",
        "--teacher.num_gpus_per_actor",
        "1",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and "GPU" in errors[0] and "teacher pool 1" in errors[0], errors
    assert "Traceback" not in proc.stderr
    assert time.time() - start < 60


@pytest.mark.e2e  # a whole fit against a server
@pytest.mark.slow
def test_tracking_server_dying_mid_run_only_warns(ray_cluster, tmp_path):
    import tvkd_ray

    with mlflow_server(tmp_path / "mlflow.db") as (base, server):
        cfg = load_config(
            TINY,
            [
                f"run.output_dir={tmp_path / 'out'}",
                "run.name=flaky",
                f"tracking.uri={base}",
                "train.max_steps=4",
                "train.save_every=2",
                "data.eval_path=null",
            ],
        )
        id_file = cfg.run_dir / "mlflow_run_id"

        def kill_when_run_opens():
            while not id_file.exists() and server.poll() is None:
                time.sleep(0.2)
            os.killpg(server.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_run_opens, daemon=True)
        killer.start()
        result = tvkd_ray.fit(cfg)
        killer.join(timeout=30)
    assert server.poll() is not None, "the tracking server should have been killed mid-run"
    assert result.metrics["step"] == 4
    assert (Path(result.model_dir) / "model.safetensors").exists()
    assert result.mlflow_run_id == id_file.read_text()
