"""jobs/gpu_check.py in its dry mode (CPU, tiny models, 2 steps per run), so the prepared GPU
check cannot rot between the rare sessions that have an accelerator."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import gpu_check  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # whole fits: make test-e2e


def test_dry_gpu_check_runs_every_step(ray_cluster, tmp_path):
    report = gpu_check.main(["--dry", "--out-dir", str(tmp_path)])
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == report
    phi = report["potentials"]
    # Dry, the "gpu" actor is a CPU one: fp32 agrees to the bit, bf16 weights do not.
    assert phi["tokens"] > 0 and phi["gpu_fp32_max_abs_diff"] == 0.0
    assert 0.0 < phi["gpu_bf16_max_rel_diff"] < 0.1
    assert set(report["runs"]) == {"tvkd", "dpo"}  # dry: lora is trained by other tests
    for name, run in report["runs"].items():
        assert run["step0_eval_margin"] == 0.0, name  # the reference computes as the student
        assert run["student_tokens_per_s"] > 0 and run["reference_tokens_per_s"] > 0, name
    assert report["runs"]["tvkd"]["teacher_tokens_per_s"] > 0
    assert report["runs"]["dpo"]["teacher_tokens_per_s"] is None  # no teacher in DPO
    assert report["tvkd_over_dpo_wall"] > 0
