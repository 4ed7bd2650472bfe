"""What every suite's record and table are made of: the machine the figures come from, plain-text
tables and medians."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
from pathlib import Path

from benchmarks.common import THREADS


def machine() -> dict:
    """Where the numbers come from: CPU, memory, load and library versions."""
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for package in ("torch", "ray", "transformers", "trl", "mlflow", "pyarrow", "tvkd-ray"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        # Other users' load makes timings noisy; recorded so readers can judge.
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads_baselines": THREADS,
        "versions": versions,
    }


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text table; numbers are right-aligned."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
