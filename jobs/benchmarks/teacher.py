"""``teacher``: peak RSS growth and time of the chunked potentials vs full logits, several sizes
(``measure_teacher.memory``, each in fresh processes)."""

from __future__ import annotations

import measure_teacher

from benchmarks.common import Bench
from benchmarks.report import median, table
from tvkd_ray.potentials import DEFAULT_CHUNK_BYTES

HIDDEN_SIZE = 576  # SmolLM2's width; the LM-head matmul cost scales with it


def run(bench: Bench) -> tuple[dict, str]:
    cases = [measure_case(bench, positions, vocab) for positions, vocab in bench.plan.memory_cases]
    rows = [
        [
            c["positions"],
            c["vocab"],
            c["full_logits_fp32_mib"],
            c["chunked"]["peak_rss_growth_mib"],
            c["full"]["peak_rss_growth_mib"],
            c["chunked"]["seconds"],
            c["full"]["seconds"],
        ]
        for c in cases
    ]
    text = table(
        [
            "positions",
            "vocab",
            "logits MiB",
            "chunked peak MiB",
            "full peak MiB",
            "chunked s",
            "full s",
        ],
        rows,
    )
    text += (
        f"\npeak = RSS high-water growth of the computation in a fresh process (median of "
        f"{bench.plan.memory_repeats}); hidden {HIDDEN_SIZE}; {measure_teacher.THREADS} threads; "
        f"one chunk of fp32 logits <= {DEFAULT_CHUNK_BYTES / 2**20:.0f} MiB"
    )
    return {"cases": cases, "threads": measure_teacher.THREADS}, text


def measure_case(bench: Bench, positions: int, vocab: int) -> dict:
    """Both paths of one (positions, vocab) case, medians over the plan's repeats."""
    runs = [
        measure_teacher.memory(positions, HIDDEN_SIZE, vocab)
        for _ in range(bench.plan.memory_repeats)
    ]
    case = {
        "positions": positions,
        "vocab": vocab,
        "hidden_size": HIDDEN_SIZE,
        "full_logits_fp32_mib": runs[0]["full_logits_fp32_mib"],
        "chunk_fp32_mib": DEFAULT_CHUNK_BYTES / 2**20,
    }
    for path in ("chunked", "full"):
        case[path] = {
            "peak_rss_growth_mib": median([r[path]["peak_rss_growth_mib"] for r in runs]),
            "seconds": median([r[path]["seconds"] for r in runs]),
            "repeats": len(runs),
        }
    return case
