"""The benchmark script (SPEC §7): its baseline runs the library's own step, and the script runs,
prints its table and writes its JSON.

Only the quickest suite runs here (payload, ~30 s); the figures themselves are benchmarks, not
timed tests, and come from ``python jobs/bench.py`` on a quiet machine (docs/BENCHMARKS.md).
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "jobs" / "bench.py"
sys.path.insert(0, str(REPO / "jobs"))  # the suites' package, as jobs/bench.py imports it

from benchmarks.bare import bare_loop, bare_summary  # noqa: E402
from benchmarks.common import QUICK, Bench  # noqa: E402

from actors.inference import FrozenModelSpec  # noqa: E402
from actors.reference import ReferenceLogps  # noqa: E402
from actors.teacher import TeacherPotentials  # noqa: E402
from driver.inputs import ModelPaths  # noqa: E402
from driver.pools import roles  # noqa: E402
from tvkd_ray.forward import ResponseLogps  # noqa: E402
from tvkd_ray.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from tvkd_ray.step import Objective, StudentStep  # noqa: E402


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tiny_bench(tmp_path) -> Bench:
    """A Bench on the tiny test models instead of the 49k-vocabulary bench models."""
    models = {"teacher": resolve_model("tiny-teacher"), "student": resolve_model("tiny-student")}
    return Bench(QUICK, tmp_path, tmp_path, models=models)


def _library_step(bench: Bench, cfg, table):
    """(loss, sums) of the trainer's StudentStep on ``table`` scored by the actor classes."""
    teacher, student = bench.model("teacher"), bench.model("student")
    if cfg.uses_teacher:
        paths = ModelPaths(
            student_init=student, reference=student, tokenizer=student, teacher=teacher
        )
        (spec,) = [role.spec for role in roles(cfg, paths) if role.name == "teacher"]
        table = TeacherPotentials(replace(spec, dtype="float32"))(table)
    table = ReferenceLogps(FrozenModelSpec(student, dtype="float32"))(table)
    policy = ResponseLogps(load_model(student)).train()
    pad_id = load_tokenizer(student).pad_token_id
    return StudentStep(Objective.from_config(cfg), policy, pad_id, "cpu")(table)


@pytest.mark.parametrize("stage", ["tvkd", "dpo"])
def test_bare_loop_trains_with_the_library_step(tiny_bench, stage):
    cfg = tiny_bench.config("test", [f"run.stage={stage}"])
    table = tiny_bench.batches()[0]
    precompute = stage == "dpo"  # as the trl suite runs it
    records = bare_loop(tiny_bench, [table], cfg, threads=1, precompute_reference=precompute)

    loss, sums = _library_step(tiny_bench, cfg, table)
    (record,) = records
    assert record["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert record["tokens"] == sums["tokens"] > 0
    stages = ["reference", "student", "total"] if stage == "tvkd" else ["student", "total"]
    stages = (["teacher"] if stage == "tvkd" else []) + stages
    assert list(record["seconds"]) == stages
    summary = bare_summary(records, warmup=0)
    assert summary["batches_measured"] == 1 and summary["tokens_per_s"] > 0
    assert list(summary["seconds"]) == stages


@pytest.mark.slow
def test_quick_payload_suite_prints_and_writes_its_figures(tmp_path):
    proc = _bench("--quick", "--suites", "payload", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Arrow B/token" in proc.stdout

    record = json.loads((tmp_path / "payload.json").read_text())
    assert (record["suite"], record["mode"], record["status"]) == ("payload", "quick", "ok")
    assert "--suites payload" in record["command"]
    assert record["started"] <= record["finished"]
    machine = record["machine"]
    assert machine["cpu_count"] >= 1 and machine["ram_gib"] > 0
    assert machine["versions"]["torch"] and machine["versions"]["ray"]

    results = record["results"]
    assert results["potentials_only_arrow_bytes_per_token"] <= 8.0
    bundled = results["datasets"]["bundled"]
    assert bundled["response_tokens"] > 0
    potentials = bundled["potentials only"]["arrow_bytes_per_token"]
    # float32 per token plus list offsets; top-k adds 32 ids and 32 log-probs per chosen token.
    assert 4.0 <= potentials <= 8.0
    assert bundled["potentials + top-32"]["arrow_bytes_per_token"] > 10 * potentials


@pytest.mark.slow
def test_unknown_suite_is_refused_before_any_work(tmp_path):
    proc = _bench("--suites", "payload,nope", "--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown suite(s) nope" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_students_suite_times_every_set_up(tiny_bench):
    from benchmarks import students

    results, text = students.run(tiny_bench)
    assert list(results["runs"]) == list(students.SETUPS)
    for name, run in results["runs"].items():
        assert run["step_s"] > 0 and name in text
    assert results["runs"]["full"]["x_full"] == 1.0 and results["runs"]["lora"]["x_lora"] == 1.0
