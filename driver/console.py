"""What a run prints: a short header (what runs where), then one line per stage as it moves, with
counts, rate and ETA, all from the driver; the work reports to the progress board
(``actors.progress``) from whichever node it runs on."""

from __future__ import annotations

import re
import sys
import threading

import ray

from actors.progress import ProgressBoard, Stage
from driver.streams import AUTO, auto_root, driver_node_label
from tvkd_ray.config import TVKDConfig

PREFIX = "[tvkd]"


def duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:03``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def stage_line(name: str, stage: Stage, now: float) -> str:
    """``[tvkd] teacher train   96/247 pairs  3.2 pairs/s  ETA 0:47``."""
    done = stage.done
    counts = f"{done}/{stage.total} {stage.unit}"
    if stage.unit == "steps":
        counts = f"step {done}/{stage.total}"
    parts = [f"{PREFIX} {name:<15} {counts}"]
    if stage.detail:
        parts.append(stage.detail)
    rate = stage.rate(now)
    if rate:
        parts.append(f"{rate:.3g} {stage.unit}/s")
        if stage.total > done:
            parts.append(f"ETA {duration((stage.total - done) / rate)}")
    if stage.total and done >= stage.total and stage.started is not None:
        parts.append(f"done in {duration(now - stage.started)}")
    return "  ".join(parts)


def header(
    cfg: TVKDConfig, num_train: int, num_eval: int, cross_tokenizer: bool = False
) -> list[str]:
    """What runs where: the pools and the trainers, their devices and caches, and the data (and
    that the teacher's potentials are mapped, when it has its own tokenizer)."""
    lines = [f"{PREFIX} run {cfg.run.name} (stage {cfg.run.stage}) in {cfg.run_dir}"]
    for name, pool in cfg.pools().items():
        model = getattr(pool, "model", None) or "the student's initial weights"
        gpus = f" + {pool.num_gpus_per_actor:g} GPU" if pool.num_gpus_per_actor else ""
        lines.append(
            f"{PREFIX} {name:<9} {model}: {pool.num_actors} actor(s) of "
            f"{pool.num_cpus_per_actor:g} CPU{gpus}, cache {_cache(cfg, pool.cache)}"
        )
    train = cfg.train
    gpus = f" + {train.gpus_per_worker:g} GPU" if train.use_gpu else ""
    lora = "LoRA adapters" if cfg.student.lora else "all weights"
    lines.append(
        f"{PREFIX} student   {cfg.student.model} ({lora}): {train.num_workers} Ray Train "
        f"worker(s) of {train.num_cpus_per_worker:g} CPU{gpus}, {train.strategy}"
    )
    if cross_tokenizer:
        lines.append(
            f"{PREFIX} tokenizer the teacher's differs from the student's: its potentials are "
            "mapped to the student's tokens by character offsets (docs/ARCHITECTURE.md)"
        )
    lines.append(
        f"{PREFIX} data      {num_train} train pairs, {num_eval} eval pairs; "
        f"{train.epochs} epoch(s)"
    )
    return lines


def _cache(cfg: TVKDConfig, cache: str) -> str:
    if cache == AUTO:
        return f"auto ({auto_root(cfg)})"
    return cache


class Console:
    """Polls the progress board from a thread and prints a stage's line when it has moved: at
    its first report, then at most every ``interval`` seconds, and when it is done (every step's
    metrics are in MLflow; the console stays short however many steps a run has)."""

    def __init__(self, interval: float = 30.0, out=None):
        self.board = ProgressBoard.options(label_selector=driver_node_label()).remote()
        self.interval = interval
        self.out = out or sys.stdout
        self.printed: dict[str, tuple[int, float]] = {}
        # A stage's done line is its last: a pool may read on past what a max_steps run needs.
        self.finished: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tvkd-console", daemon=True)

    def print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop polling, print where every stage ended, and let the board go."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._poll(final=True)
        ray.kill(self.board)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._poll(final=False)

    def _poll(self, final: bool) -> None:
        try:
            now, stages = ray.get(self.board.snapshot.remote(), timeout=10)
        except Exception:  # a board that is gone only costs the console its lines
            return
        for name, stage in stages.items():
            last_done, last_time = self.printed.get(name, (0, 0.0))
            if stage.done == last_done or name in self.finished:
                continue
            finished = stage.total and stage.done >= stage.total
            if finished or final or now - last_time >= self.interval:
                self.print(stage_line(name, stage, now))
                self.printed[name] = (stage.done, now)
                if finished:
                    self.finished.add(name)


class WorkerLogFilter:
    """Leaves out of the driver's console the lines Ray's own processes print about themselves
    on every run (the Train controller's placement-group watchdog, worker start-up counts, a
    deprecation inside Ray Data, C++ notes on actor arguments, each report's metrics dict).
    Everything else the workers print, warnings and errors included, still shows; ``--verbose``
    keeps it all. Ray has no public hook for this: the filter wraps the handler ``ray.init``
    installs, and does nothing if that is not there."""

    ACTORS = ("PlacementGroupCleaner",)
    LINES = re.compile(
        "|".join(
            [
                r"PYTHON worker processes have been started on node",
                r"has constructor arguments in the object store and max_restarts > 0",
                r"`ExecutionOptions\.exclude_resources` is deprecated",
                r"^\s*self\.exclude_resources = exclude_resources$",
                r"^Progress bars disabled\. To enable",
                # Ray Train's INFO lines logged outside its own loggers (its level misses them).
                r"^Reporting training result \d+: TrainingReport\(",
                r"^Checkpoint successfully created at: ",
            ]
        )
    )
    HANDLER = "ray_print_logs"

    def __init__(self):
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        self.dispatcher = global_worker_stdstream_dispatcher
        self.original = dict(self.dispatcher.handlers).get(self.HANDLER)

    def install(self) -> WorkerLogFilter:
        if self.original is not None:
            self.dispatcher.remove_handler(self.HANDLER)
            self.dispatcher.add_handler(self.HANDLER, self.emit)
        return self

    def remove(self) -> None:
        if self.original is not None:
            self.dispatcher.remove_handler(self.HANDLER)
            self.dispatcher.add_handler(self.HANDLER, self.original)

    def emit(self, data: dict) -> None:
        if data.get("actor_name") in self.ACTORS:
            return
        lines = [line for line in data.get("lines", []) if not self.LINES.search(line)]
        if lines:
            self.original({**data, "lines": lines})
