"""Smoke test of the benchmark script (SPEC §7): it runs, prints its table and writes its JSON.

Only the quickest suite runs here (payload, ~30 s); the figures themselves are benchmarks, not
timed tests, and come from ``python jobs/bench.py`` on a quiet machine (docs/BENCHMARKS.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "jobs" / "bench.py"

pytestmark = pytest.mark.slow


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


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


def test_unknown_suite_is_refused_before_any_work(tmp_path):
    proc = _bench("--suites", "payload,nope", "--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown suite(s) nope" in proc.stderr
    assert not list(tmp_path.iterdir())
