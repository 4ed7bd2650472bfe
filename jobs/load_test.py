"""Load test (SPEC §8): stream many synthetic pairs through the full pipeline and watch memory.

    .venv/bin/python jobs/load_test.py [--pairs 20000] [--epochs 2] [--out-dir load-results]

Tiny config-built models, ``teacher.cache=none`` and ``reference.cache=none`` (both pools really
stream every epoch), the real Ray Data → actor pools → Ray Train path. A sampler records the
driver's RSS, the object store's use and what was spilled every few seconds; the trainer's
per-epoch pair ids show whether every pair was trained exactly once per epoch. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from tvkd_ray import runtime  # noqa: E402
from tvkd_ray.config import load_config  # noqa: E402


def write_pairs(path: Path, n: int) -> None:
    """Synthetic arithmetic pairs, distinct prompts so pair ids are easy to audit."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 97 + 1, i // 97 + 1
            f.write(
                json.dumps(
                    {
                        "prompt": f"User: add {a} and {b}.\nAssistant:",
                        "chosen": f" {a + b}",
                        "rejected": f" {a + b + 1}",
                    }
                )
                + "\n"
            )


def object_store_mib(gcs_address: str) -> tuple[float, float]:
    """(in use, spilled) MiB across the cluster, from Ray's memory summary."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=gcs_address, stats_only=True)
    used = re.search(r"Plasma memory usage (\d+) MiB", text)
    spilled = re.search(r"Spilled (\d+) MiB", text)
    return (float(used.group(1)) if used else 0.0, float(spilled.group(1)) if spilled else 0.0)


class Sampler(threading.Thread):
    def __init__(self, every_s: float, gcs_address: str):
        super().__init__(daemon=True)
        self.gcs_address = gcs_address
        self.every_s = every_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.start_time = time.time()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            row = {
                "t_s": round(time.time() - self.start_time, 1),
                "driver_rss_mib": me.memory_info().rss / 2**20,
            }
            try:
                row["object_store_mib"], row["spilled_mib"] = object_store_mib(self.gcs_address)
            except Exception as exc:  # Ray not up yet, or shutting down
                row["error"] = type(exc).__name__
            self.samples.append(row)
            self.stop.wait(self.every_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out-dir", default="load-results")
    parser.add_argument("--every-s", type=float, default=5.0)
    args = parser.parse_args()
    runtime.set_defaults(runtime.PRIVATE_CLUSTER_ENV)

    import ray

    import tvkd_ray

    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tvkd-load-"))
    data = work / "pairs.jsonl"
    write_pairs(data, args.pairs)
    cfg = load_config(
        REPO / "examples" / "tiny.yaml",
        [
            f"run.output_dir={work}",
            "run.name=load",
            f"data.train_path={data}",
            "data.eval_path=null",
            "teacher.cache=none",
            "reference.cache=none",
            "teacher.batch_size=64",
            "reference.batch_size=64",
            "train.batch_size=64",
            f"train.epochs={args.epochs}",
            "train.max_steps=null",
            "train.save_every=0",
            "train.log_every=10",
        ],
    )
    ray.init(
        address="local",
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": runtime.cluster_env_vars()},
    )
    sampler = Sampler(args.every_s, ray.get_runtime_context().gcs_address)
    sampler.start()
    start = time.time()
    result = tvkd_ray.fit(cfg)
    wall = time.time() - start
    sampler.stop.set()
    sampler.join()
    ray.shutdown()

    per_epoch = []
    for epoch in range(args.epochs):
        ids = np.load(Path(result.run_dir) / "pairs_seen" / f"epoch{epoch}.npy")
        counts = np.bincount(ids, minlength=args.pairs)
        per_epoch.append(
            {
                "epoch": epoch,
                "pairs_trained": int(len(ids)),
                "lost": int((counts == 0).sum()),
                "duplicated": int((counts > 1).sum()),
            }
        )
    import mlflow

    history = mlflow.MlflowClient(result.tracking_uri).get_metric_history(
        result.mlflow_run_id, "perf/pairs_per_s"
    )
    samples = [s for s in sampler.samples if "error" not in s]
    rss = [s["driver_rss_mib"] for s in samples]
    half = len(rss) // 2
    report = {
        "command": " ".join(sys.argv),
        "pairs": args.pairs,
        "epochs": args.epochs,
        "wall_s": round(wall, 1),
        "pairs_per_s_overall": round(args.pairs * args.epochs / wall, 1),
        "pairs_per_s_by_step": [(m.step, round(m.value, 1)) for m in history],
        "epochs_audit": per_epoch,
        "driver_rss_mib": {
            "first_half_max": max(rss[:half] or [0]),
            "second_half_max": max(rss[half:] or [0]),
        },
        "object_store_mib_max": max((s["object_store_mib"] for s in samples), default=0.0),
        "spilled_mib_max": max((s["spilled_mib"] for s in samples), default=0.0),
        "samples": sampler.samples,
    }
    (out_dir / "load_test.json").write_text(json.dumps(report, indent=1))
    print(f"{'t_s':>7} {'driver RSS MiB':>15} {'object store MiB':>17} {'spilled MiB':>12}")
    for s in samples[:: max(1, len(samples) // 25)]:
        print(
            f"{s['t_s']:>7} {s['driver_rss_mib']:>15.0f} {s['object_store_mib']:>17.0f} "
            f"{s['spilled_mib']:>12.0f}"
        )
    for row in per_epoch:
        print(
            f"epoch {row['epoch']}: trained {row['pairs_trained']} pairs, lost {row['lost']}, "
            f"duplicated {row['duplicated']}"
        )
    print(
        f"wall {wall:.0f}s, {report['pairs_per_s_overall']} pairs/s overall; "
        f"JSON: {out_dir / 'load_test.json'}"
    )
    ok = all(r["lost"] == 0 and r["duplicated"] == 0 for r in per_epoch)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
