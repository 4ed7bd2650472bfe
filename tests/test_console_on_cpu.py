"""The driver's console on a real Ray cluster: progress lines with counts, rates and ETAs from
the progress board, each trainer report printed once, and Ray's own notices filtered while
everything else the workers print gets through."""

import io
import time

from actors.progress import report
from driver.console import Console, WorkerLogFilter, duration


def test_stage_lines_show_counts_rate_eta_and_each_step_once(ray_cluster):
    out = io.StringIO()
    console = Console(interval=0.0, out=out)
    board = console.board
    report(board, "expect", "teacher train", 24, "pairs")
    report(board, "add", "teacher train", 8)
    time.sleep(0.5)
    report(board, "add", "teacher train", 8)
    for step in (1, 2, 3):
        report(board, "set", "train", step, 10, f"loss {1 / step:.3f}")
        time.sleep(0.2)
    console._poll(final=False)
    lines = out.getvalue().splitlines()
    (teacher,) = [line for line in lines if "teacher train" in line]
    assert "16/24 pairs" in teacher and "pairs/s" in teacher and "ETA " in teacher
    steps = [line for line in lines if line.startswith("[tvkd] train ")]
    assert [line.split()[3] for line in steps] == ["1/10", "2/10", "3/10"]
    assert "loss 0.333" in steps[-1] and "ETA " in steps[-1]

    report(board, "add", "teacher train", 8)
    console.close()  # the last poll: the finished stage, and no step line again
    rest = out.getvalue().splitlines()[len(lines) :]
    assert len(rest) == 1 and "24/24 pairs" in rest[0] and "done in" in rest[0]


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (0, 42.4, 725, 3723)] == ["0:00", "0:42", "12:05", "1:02:03"]


def test_worker_log_filter_drops_rays_notices_and_keeps_the_rest(ray_cluster):
    shown = []
    log_filter = WorkerLogFilter()
    log_filter.original = shown.append  # what Ray's own handler would have printed
    log_filter.emit({"actor_name": "PlacementGroupCleaner", "lines": ["Traceback ..."]})
    worker_lines = [
        "WARNING: 8 PYTHON worker processes have been started on node: abc",
        "core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: '1' has constructor "
        "arguments in the object store and max_restarts > 0. If the arguments ...",
        "Reporting training result 3: TrainingReport(checkpoint=None, metrics={'loss': 0.69})",
        "WARNING tvkd_ray.tracking: MLflow log_metrics failed (training goes on): timeout",
        "ValueError: a real error",
    ]
    log_filter.emit({"actor_name": "RayTrainWorker", "lines": worker_lines})
    assert [batch["lines"] for batch in shown] == [worker_lines[3:]]
