"""The driver's console on a real Ray cluster: progress lines with counts, rates and ETAs from
the progress board, each trainer report printed once, and Ray's own notices filtered while
everything else the workers print gets through."""

import io
import time

from actors.progress import report
from driver.console import Console, WorkerLogFilter, duration


def test_stage_lines_show_counts_rate_eta_and_each_step_once(ray_cluster):
    out = io.StringIO()
    console = Console(interval=3600.0, out=out)  # one line per stage until it is done
    board = console.board
    report(board, "expect", "teacher train", 24, "pairs")
    report(board, "add", "teacher train", 8)
    time.sleep(0.5)
    report(board, "add", "teacher train", 8)
    for step in (1, 2, 3):
        report(board, "set", "train", step, 10, f"loss {1 / step:.3f}")
        time.sleep(0.2)
    console._poll(final=False)
    console._poll(final=False)  # nothing moved: nothing printed twice
    lines = out.getvalue().splitlines()
    teacher, train = lines
    assert "teacher train   16/24 pairs" in teacher and "pairs/s  ETA " in teacher
    assert "train           step 3/10  loss 0.333" in train and "steps/s  ETA " in train

    report(board, "add", "teacher train", 8)
    report(board, "set", "train", 4, 10, "loss 0.250")
    console._poll(final=False)  # done is shown at once, a step only after the interval
    report(board, "add", "teacher train", 8)  # a pool reading on past what the steps need
    console.close()  # the last poll shows where every moved stage ended, each done line once
    rest = out.getvalue().splitlines()[len(lines) :]
    assert "24/24 pairs" in rest[0] and "done in" in rest[0]
    assert len(rest) == 2 and "step 4/10  loss 0.250" in rest[1]


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
