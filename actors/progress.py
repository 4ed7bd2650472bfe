"""The run's progress board: a small actor the work reports to (pairs scored by each pool, the
trainers' steps) and the driver reads, so the console shows every stage from one process, with
rates and ETAs, whichever node the work runs on."""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray


@dataclass
class Stage:
    """One stage's counts: ``done`` of ``total`` units; ``first_done`` of them at its first
    report (``started``), so that the rate leaves out model loading and the first unit's wait."""

    total: int
    unit: str
    done: int = 0
    first_done: int = 0
    started: float | None = None
    detail: str = ""

    def record(self, done: int, now: float) -> None:
        if self.started is None:
            self.started, self.first_done = now, done
        self.done = done

    def rate(self, now: float) -> float | None:
        """Units per second since the first report."""
        if self.started is None or self.done <= self.first_done or now <= self.started:
            return None
        return (self.done - self.first_done) / (now - self.started)


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    def __init__(self):
        self.stages: dict[str, Stage] = {}

    def expect(self, name: str, total: int, unit: str) -> None:
        """``total`` more units of ``name`` to come (a pool streaming every epoch adds each)."""
        stage = self.stages.setdefault(name, Stage(0, unit))
        stage.total += total

    def add(self, name: str, count: int) -> None:
        """``count`` more units of ``name`` done (pools report each block they finish)."""
        stage = self.stages.setdefault(name, Stage(0, "pairs"))
        stage.record(stage.done + count, time.time())

    def set(self, name: str, done: int, total: int, detail: str = "") -> None:
        """The trainers' position: step ``done`` of ``total``, with a summary of its metrics."""
        stage = self.stages.setdefault(name, Stage(total, "steps"))
        stage.record(done, time.time())
        stage.total, stage.detail = total, detail

    def snapshot(self) -> tuple[float, dict[str, Stage]]:
        return time.time(), self.stages


def report(board, method: str, *args) -> None:
    """Tell the board, never waiting and never failing: progress must not stop the work."""
    if board is None:
        return
    try:
        getattr(board, method).remote(*args)
    except Exception:  # a board that is gone only costs the console its lines
        pass
