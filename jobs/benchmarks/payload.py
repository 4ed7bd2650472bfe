"""``payload``: Arrow bytes per response token the teacher adds (Φ only, and with top-32), on the
bench's batches and, where the data is there, on HH-RLHF (``measure_teacher.payload``)."""

from __future__ import annotations

import measure_teacher

from benchmarks.common import BATCH_PAIRS, TARGETS, Bench
from benchmarks.report import table


def run(bench: Bench) -> tuple[dict, str]:
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
