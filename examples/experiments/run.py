"""The quality experiment of docs/RESULTS.md: the TVKD paper's pipeline in small, in one command.

    .venv/bin/python examples/experiments/run.py [--out DIR] [--seeds 5] [--bundled-seeds 3]
        [--lanes 2] [--arms dpo,...] [--extra-eval PATH ...] [--smoke] [--docs]

1. Split the shared HH-RLHF harmless pairs: the first 1,800 lines are the train split, the last
   200 the test split. The teacher trains on the whole train split, the students on its first
   ``pairs`` lines: the teacher knows more than the students can see.
2. Teacher: SmolLM2-135M-Instruct DPO-trained on them (``run.stage=dpo``); its pre-DPO weights
   are ``teacher.ref_model`` of the implicit_reward potential. Students: SmolLM2's first 2 layers
   SFT'd on the chosen responses (``run.stage=sft``), on HH and on the bundled data.
3. Every arm (plain DPO; TVKD with the implicit-reward potential and with the authors' bounded
   soft value at three strengths; the authors' released recipe, ``loss.objective=release``; DPO +
   KD) with each seed: same steps, learning rate and data; the seed changes the data order. Runs
   that share the teacher's work wait for the one that fills its cache entry.
4. The same comparison on the bundled dataset, against its ground truth (the chosen answer is
   the correct one by construction), with the untrained SmolLM2 as the soft-value teacher.
5. The report: each arm's final eval accuracy paired by seed with DPO's, the teacher's signal
   read from the cache, and each ``--extra-eval`` file's accuracy (``jobs/eval.py`` on the final
   model against its SFT start).

Every training run is the real CLI (``jobs/tvkd.py``), ``lanes`` of them at a time; what does not
need the DPO teacher runs while it trains. A finished run is skipped when the command is run
again, so an interrupted experiment resumes. Results go to ``<out>/report`` (JSON, Markdown
tables, PNG plots); ``--docs`` also writes them to ``docs/results/``. MLflow holds every run:

    mlflow ui --backend-store-uri sqlite:///<out>/runs/mlflow.db --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
HH_FILE = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
BUNDLED = REPO / "examples" / "data" / "bundled"
TRAIN_LINES = 1800  # the fixed split of the issue: first 1,800 train, last 200 test
TEACHER, TEACHER_RUN = HERE / "hh_teacher_dpo.yaml", "hh-teacher-dpo"
SFT, STUDENT = HERE / "hh_student_sft.yaml", HERE / "hh_student.yaml"  # the students' configs
EVAL_KEYS = ("eval/rewards/accuracies", "eval/rewards/margins", "eval/loss")
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from tvkd_ray import figures, schema  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """Sizes; the full plan runs in about two hours on 2 CPU cores, ``--smoke`` in minutes."""

    teacher_pairs: int  # train-split pairs the teacher DPO-trains on (the first ones)
    pairs: int  # train-split pairs the students train on (the first ones)
    test_pairs: int  # test-split pairs evaluated (the last ones of the file)
    teacher_epochs: int
    student_epochs: int
    bundled_pairs: int  # bundled training pairs (its eval file is used whole)


FULL = Plan(
    teacher_pairs=TRAIN_LINES,
    pairs=256,
    test_pairs=200,
    teacher_epochs=1,
    student_epochs=1,
    bundled_pairs=256,
)
SMOKE = Plan(
    teacher_pairs=32,
    pairs=16,
    test_pairs=16,
    teacher_epochs=1,
    student_epochs=1,
    bundled_pairs=16,
)

# Arms: name -> overrides. The names carry c = alpha * (1 - gamma), the one knob of a centred
# potential (docs/RESULTS.md); DPO + KD is the distillation baseline.
BOUNDED = ["loss.potential=soft_value", "loss.potential_normalize=true", "loss.q_scale=0.7"]
BOUNDED_TOPK = [*BOUNDED, "loss.potential_support=top_k", "teacher.top_k=50"]
# The arms whose Φ the loss does not use keep the raw-logit soft value they ran with (its row in
# docs/RESULTS.md §1), so a rerun reproduces them and reads their caches.
RAW = ["loss.potential_normalize=false", "loss.q_scale=1.0"]
HH_ARMS = {
    "dpo": ["run.stage=dpo"],
    "tvkd-ir-c0.1": ["loss.potential=implicit_reward", "loss.alpha=1.0", "loss.gamma=0.9"],
    "tvkd-bounded-c0.05": [*BOUNDED_TOPK, "loss.alpha=0.5", "loss.gamma=0.9"],
    "tvkd-bounded-c0.1": [*BOUNDED_TOPK, "loss.alpha=1.0", "loss.gamma=0.9"],
    "tvkd-bounded-c0.5": [*BOUNDED_TOPK, "loss.alpha=5.0", "loss.gamma=0.9"],
    "release": ["loss.objective=release", "loss.gamma=1.0", "teacher.top_k=50", *RAW],
    "dpo+kd": ["loss.alpha=0", "loss.kd_weight=0.1", "teacher.top_k=32", *RAW],
}
# The bundled comparison has no DPO-trained teacher: the untrained SmolLM2's bounded soft value.
BUNDLED_ARMS = {
    k: HH_ARMS[k] for k in ("dpo", "tvkd-bounded-c0.05", "tvkd-bounded-c0.1", "tvkd-bounded-c0.5")
}


def log(message: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
    return path


def split_data(out: Path, plan: Plan) -> dict[str, Path]:
    """The fixed HH split, and the bundled subset, as JSONL files under ``<out>/data``."""
    if not HH_FILE.is_file():
        sys.exit(f"error: {HH_FILE} not found (the shared HH-RLHF pairs)")
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as fh:
        lines = fh.readlines()
    if len(lines) != 2000:
        sys.exit(f"error: {HH_FILE}: expected 2,000 lines, found {len(lines)}")
    train, test = lines[:TRAIN_LINES], lines[TRAIN_LINES:]
    bundled = (BUNDLED / "train.jsonl").read_text().splitlines(keepends=True)
    bundled_eval = (BUNDLED / "eval.jsonl").read_text().splitlines(keepends=True)
    return {
        "hh_teacher": write_lines(out / "data" / "hh_teacher.jsonl", train[: plan.teacher_pairs]),
        "hh_train": write_lines(out / "data" / "hh_train.jsonl", train[: plan.pairs]),
        "hh_eval": write_lines(out / "data" / "hh_test.jsonl", test[-plan.test_pairs :]),
        "bundled_train": write_lines(
            out / "data" / "bundled_train.jsonl", bundled[: plan.bundled_pairs]
        ),
        "bundled_eval": write_lines(
            out / "data" / "bundled_eval.jsonl", bundled_eval[: max(plan.test_pairs, 16)]
        ),
    }


def is_student_run(name: str) -> bool:
    """Student runs are named ``<prefix>-<arm>-s<seed>`` (``student_runs``)."""
    return re.search(r"-s\d+$", name) is not None


class Runner:
    """Runs the CLI, one log file per run, and skips runs that already finished."""

    def __init__(self, out: Path, extra_eval: list[Path]):
        from mlflow.tracking import MlflowClient

        self.extra_eval = extra_eval
        self.runs = out / "runs"
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        # One store for every run; created here, before two lanes could race to create it.
        self.tracking_uri = f"sqlite:///{self.runs / 'mlflow.db'}"
        MlflowClient(tracking_uri=self.tracking_uri).search_experiments()

    def done_file(self, name: str) -> Path:
        return self.runs / name / "experiment-done.json"

    def train(self, name: str, config: Path, overrides: list[str], keep_model: bool) -> dict:
        """The run's result (its eval history, and for a student its scores on the extra
        files); its done file is written as soon as training ends, so a failed extra
        evaluation is retried on the next call without training again."""
        done = self.done_file(name)
        result = (
            json.loads(done.read_text()) if done.exists() else self.run_cli(name, config, overrides)
        )
        done.write_text(json.dumps(result, indent=1))
        if keep_model:
            return result
        scores = result.setdefault("extra_eval", {})
        missing = [path for path in self.extra_eval if path.name not in scores]
        if missing:
            scores.update(self.score_extra(name, config, overrides, missing))
            done.write_text(json.dumps(result, indent=1))
        # Students: the metrics are the result; their weights would fill the disk.
        for sub in ("model", "train", "student_init", "pairs_seen"):
            shutil.rmtree(self.runs / name / sub, ignore_errors=True)
        return result

    def unscored(self) -> list[str]:
        """Finished student runs whose model is deleted but that lack a score on one of the
        extra files (they finished before it was asked for)."""
        missing = []
        for done in sorted(self.runs.glob("*/experiment-done.json")):
            scored = json.loads(done.read_text()).get("extra_eval", {})
            run = done.parent
            if is_student_run(run.name) and not (run / "model").is_dir():
                missing += [
                    f"{run.name}: {p.name}" for p in self.extra_eval if p.name not in scored
                ]
        return missing

    def run_cli(self, name: str, config: Path, overrides: list[str]) -> dict:
        """One training run of the CLI, logged to ``<out>/logs/<name>.log``."""
        args = [f"run.name={name}", f"run.output_dir={self.runs}", *overrides]
        command = [sys.executable, str(REPO / "jobs" / "tvkd.py"), "--config", str(config)]
        command += [f"--{a}" for a in args]
        log(f"start {name}")
        started = time.time()
        with open(self.logs / f"{name}.log", "w") as fh:
            fh.write(" ".join(command) + "\n\n")
            fh.flush()
            proc = subprocess.run(command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (self.logs / f"{name}.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"run {name} failed (exit {proc.returncode}):\n" + "\n".join(tail))
        result = {"name": name, "seconds": round(time.time() - started, 1), **self.history(name)}
        log(f"done  {name} in {result['seconds']:.0f} s")
        return result

    def score_extra(self, name: str, config: Path, overrides: list[str], files: list[Path]):
        """``jobs/eval.py`` on each file: the final model against its reference (the SFT
        start), with the run's β and lengths; {file name: its JSON result}."""
        from tvkd_ray.config import load_config

        model = self.runs / name / "model"
        if not model.is_dir():
            raise RuntimeError(
                f"run {name} finished before --extra-eval {files[0].name} was asked for, and its "
                f"model is deleted: remove {self.runs / name} to train it again"
            )
        cfg = load_config(config, overrides)
        scores = {}
        for path in files:
            command = [
                sys.executable, str(REPO / "jobs" / "eval.py"),
                "--model", str(model),
                "--ref-model", cfg.student.model,
                "--data", str(path),
                "--beta", str(cfg.loss.beta),
                "--max-length", str(cfg.data.max_length),
                "--max-prompt-length", str(cfg.data.max_prompt_length),
            ]  # fmt: skip
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"run {name}: jobs/eval.py on {path} failed: {proc.stderr}")
            scores[path.name] = json.loads(proc.stdout.splitlines()[-1])
        return scores

    def history(self, name: str) -> dict:
        """Eval metric histories [(step, value)] of the run, read back from its MLflow store,
        and the MLflow run's duration: training and eval, without any scoring before training.
        Unlike the CLI call's wall time (``seconds``) it stays right for a run that a stopped
        runner left to finish alone."""
        from mlflow.tracking import MlflowClient

        run_id = (self.runs / name / "mlflow_run_id").read_text().strip()
        client = MlflowClient(tracking_uri=self.tracking_uri)
        run = client.get_run(run_id)
        out = {"mlflow_run_id": run_id, "status": run.info.status}
        for key in sorted(k for k in run.data.metrics if k.startswith("eval/")):
            # The final eval may share its step with a periodic one: keep one value per step.
            by_step = {m.step: m.value for m in client.get_metric_history(run_id, key)}
            out[key] = sorted(by_step.items())
        if run.info.status != "FINISHED" or "eval/loss" not in out:
            raise RuntimeError(f"run {name}: MLflow run {run_id} is {run.info.status}, no eval")
        out["mlflow_seconds"] = round((run.info.end_time - run.info.start_time) / 1000, 1)
        return out


class Lanes:
    """Training runs ``lanes`` at a time, each started once the runs it comes after finished.

    A run is added after the runs it waits for, so a started run never waits for one that has
    not started (no deadlock). The first failure stops the experiment."""

    def __init__(self, lanes: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=lanes)
        self.futures: dict[str, concurrent.futures.Future] = {}
        # Set by the failing run itself: its lane takes the next queued run at once, before
        # results() could cancel it.
        self.failed = threading.Event()

    def add(self, name: str, job, after: Sequence[str] = ()) -> None:
        waits = [self.futures[n] for n in after]

        def run():
            for wait in waits:
                wait.result()  # re-raises that run's failure
            if self.failed.is_set():
                raise RuntimeError(f"{name} not started: an earlier run failed")
            try:
                return job()
            except BaseException:
                self.failed.set()
                raise

        self.futures[name] = self.pool.submit(run)

    def results(self) -> dict[str, dict]:
        """Every run's result; at the first failure the runs not started yet are cancelled
        (the ones running finish) and the failure is raised."""
        try:
            futures = self.futures.values()
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
            return {name: f.result() for name, f in self.futures.items()}
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)


def student_runs(prefix: str, arms: dict, seeds: int, common: list[str]):
    """(name, overrides, the run it waits for) of every arm x seed: the first run of each teacher
    setting fills that setting's cache entry, and the others wait for it (None: it is first)."""
    firsts, runs = {}, []
    for arm, overrides in arms.items():
        for seed in range(seeds):
            name = f"{prefix}-{arm}-s{seed}"
            key = cache_key_of(overrides)
            runs.append((name, [*common, *overrides, f"run.seed={seed}"], firsts.get(key)))
            firsts.setdefault(key, name)
    return runs


def cache_key_of(overrides: list[str]) -> tuple:
    """Arms with the same teacher work share one cache entry; run those one after another.
    alpha and gamma only weigh what the teacher streamed, so they do not change the entry."""
    return tuple(sorted(o for o in overrides if not o.startswith(("loss.alpha=", "loss.gamma="))))


def teacher_setting(entry: Path) -> dict | None:
    """What the teacher that scored a cache entry computed, from the teacher's spec in its
    fingerprint: ``potential`` (a label of the potential kind and its options) and ``streams``
    (what else it sent: top-k for KD, both sides' top-k for release); None without a teacher."""
    parts = json.loads((entry / "_fingerprint.json").read_text())
    if "teacher" not in parts:
        return None
    spec = json.loads(parts["teacher"])
    label = spec["potential"]
    if spec.get("normalize"):
        label += f" normalised, q {spec['q_scale']}"
    if spec.get("support_top_k"):
        label += f", top-{spec['support_top_k']} + rest"
    streams = "release top-k" if spec.get("rejected_top_k") else "KD top-k" if spec["top_k"] else ""
    return {"potential": label, "streams": streams}


def teacher_signal(cache: Path, gamma: float = 0.9) -> list[dict]:
    """Per cached eval entry (one per teacher setting): how often the teacher's summed centred
    potential is larger on the chosen response, and the size of the offset it puts in Δ."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = []
    for entry in sorted(cache.glob("eval-*")):
        teacher = teacher_setting(entry)
        if teacher is None:
            continue
        table = pq.read_table(entry / "data")
        sums, means = {}, {}
        for side in ("chosen", "rejected"):
            column = schema.CHOSEN_POTENTIALS if side == "chosen" else schema.REJECTED_POTENTIALS
            centred = [np.asarray(p) - p[0] for p in table[column].to_pylist()]
            sums[side] = np.array([c.sum() if len(c) else 0.0 for c in centred])
            means[side] = np.array([c.mean() if len(c) else 0.0 for c in centred])
        ids = {"chosen": schema.CHOSEN_IDS, "rejected": schema.REJECTED_IDS}
        lengths = {s: np.array([len(x) for x in table[ids[s]].to_pylist()]) for s in sums}
        diff = sums["chosen"] - sums["rejected"]
        rows.append(
            {
                **teacher,
                "pairs": table.num_rows,
                "chosen_larger_sum": float(np.mean(diff > 0)),
                "ties": float(np.mean(diff == 0)),
                # Sums grow with length: the per-token mean and the lengths show how much of
                # the ranking is length.
                "chosen_larger_mean": float(np.mean(means["chosen"] > means["rejected"])),
                "chosen_longer": float(np.mean(lengths["chosen"] > lengths["rejected"])),
                "rejected_longer": float(np.mean(lengths["chosen"] < lengths["rejected"])),
                "offset_per_alpha_median_abs": float(np.median(np.abs((1 - gamma) * diff))),
                "entry": entry.name,
            }
        )
    return rows


def paired(values: list[float], baseline: list[float], resamples: int = 10_000) -> dict:
    """Per-seed differences against the baseline's runs of the same seed (same data order):
    their mean, a 95 % percentile-bootstrap interval of the mean, wins/losses and a two-sided
    sign test. With 5 seeds the smallest sign-test p is 2/32 = 0.0625 and the bootstrap interval
    is narrow-biased: both describe the seeds run, they prove nothing at 5 %."""
    import numpy as np

    diffs = np.asarray(values) - np.asarray(baseline)
    rng = np.random.default_rng(0)
    means = rng.choice(diffs, size=(resamples, len(diffs))).mean(axis=1)
    wins, losses = int((diffs > 0).sum()), int((diffs < 0).sum())
    n, k = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {
        "diffs": diffs.round(6).tolist(),
        "mean": float(diffs.mean()),
        "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "wins": wins,
        "losses": losses,
        "sign_test_p": min(1.0, 2 * tail),
    }


def support_difference(teacher_dir: str, pairs: Path, n: int = 64) -> dict:
    """The bounded soft value (τ 1, q 0.7 on log-probs) over the whole vocabulary against the
    TVKD authors' top-50 + rest, both from one teacher on the first ``n`` pairs of a file: the
    per-token values, and whether the summed centred offsets still rank the pairs alike."""
    import numpy as np

    from actors.teacher import TeacherPotentials, TeacherSpec
    from tvkd_ray.config import load_config
    from tvkd_ray.data import load_pairs, tokenize_batch
    from tvkd_ray.models import load_tokenizer

    lengths = load_config(STUDENT, [f"teacher.model={teacher_dir}"]).data
    tokens = tokenize_batch(
        load_pairs(pairs, on_invalid="skip").table.slice(0, n),
        load_tokenizer(teacher_dir),
        max_length=lengths.max_length,
        max_prompt_length=lengths.max_prompt_length,
    )
    phi, offsets = {}, {}
    for support, k in (("vocab", 0), ("top50", 50)):
        spec = TeacherSpec(teacher_dir, dtype="float32", normalize=True, q_scale=0.7,
                           support_top_k=k)  # fmt: skip
        out = TeacherPotentials(spec)(tokens)
        sides = [[np.asarray(p) for p in out[c].to_pylist()] for c in schema.POTENTIALS]
        phi[support] = np.concatenate([p for side in sides for p in side])
        chosen, rejected = ([(p - p[0]).sum() for p in side] for side in sides)
        offsets[support] = np.asarray(chosen) - np.asarray(rejected)
    return {
        "pairs": tokens.num_rows,
        "tokens": int(phi["vocab"].size),
        "phi_mean": {k: float(v.mean()) for k, v in phi.items()},
        "phi_mean_abs_difference": float(np.abs(phi["vocab"] - phi["top50"]).mean()),
        "phi_correlation": float(np.corrcoef(phi["vocab"], phi["top50"])[0, 1]),
        "offset_median_abs": {k: float(np.median(np.abs(v))) for k, v in offsets.items()},
        "offset_same_sign": float(np.mean(np.sign(offsets["vocab"]) == np.sign(offsets["top50"]))),
    }


def summarise(results: list[dict], arms: dict, seeds: int, prefix: str) -> list[dict]:
    """Per arm: mean ± std over seeds (sample std) of the final eval metrics and of each extra
    file's accuracy, and the accuracies paired by seed against DPO."""
    by_name = {r["name"]: r for r in results}
    runs = {arm: [by_name[f"{prefix}-{arm}-s{s}"] for s in range(seeds)] for arm in arms}

    def spread(values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": std, "values": values}

    def accuracies(arm, where=None):
        if where is None:
            return [r["eval/rewards/accuracies"][-1][1] for r in runs[arm]]
        return [r["extra_eval"][where]["preference_accuracy"] for r in runs[arm]]

    extra = sorted(runs["dpo"][0].get("extra_eval", {}))
    rows = []
    for arm in arms:
        row = {"arm": arm, "seeds": seeds}
        for key in EVAL_KEYS:
            row[key] = spread([r[key][-1][1] for r in runs[arm]])
        row["vs_dpo"] = paired(accuracies(arm), accuracies("dpo"))
        row["extra_eval"] = {
            where: {**spread(accuracies(arm, where)), "vs_dpo": paired(accuracies(arm, where),
                                                                       accuracies("dpo", where))}
            for where in extra
        }  # fmt: skip
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Final eval accuracy, the per-seed paired difference against DPO (mean, 95 % bootstrap
    interval, wins-losses, sign test), the margin, and each extra file's accuracy. (The eval loss
    of a TVKD arm includes its shaping offset: not comparable.)"""
    extra = list(rows[0]["extra_eval"])
    lines = [
        "| arm | eval preference accuracy | vs DPO, paired by seed [95 % CI] "
        "| wins–losses (sign p) | eval margin β·Δlog-ratio |"
        + "".join(f" accuracy on {w} (vs DPO) |" for w in extra),
        "| --- | --- | --- | --- | --- |" + " --- |" * len(extra),
    ]
    for row in rows:
        acc, margin, vs = row["eval/rewards/accuracies"], row["eval/rewards/margins"], row["vs_dpo"]
        baseline = row["arm"] == "dpo"
        cells = [
            row["arm"],
            f"{acc['mean']:.3f} ± {acc['std']:.3f}",
            "—" if baseline else f"{vs['mean']:+.3f} [{vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}]",
            "—" if baseline else f"{vs['wins']}–{vs['losses']} ({vs['sign_test_p']:.2f})",
            f"{margin['mean']:.3f} ± {margin['std']:.3f}",
        ]
        for where in extra:
            e = row["extra_eval"][where]
            versus = "" if baseline else f" ({e['vs_dpo']['mean']:+.3f})"
            cells.append(f"{e['mean']:.3f} ± {e['std']:.3f}{versus}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_paired(path: Path, panels: list[tuple[str, list[dict]]]) -> None:
    """Each arm's per-seed accuracy difference against DPO (dots), their mean and 95 % bootstrap
    interval (bar), one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels, strict=True):
        arms = [r for r in rows if r["arm"] != "dpo"]
        for i, row in enumerate(arms):
            vs = row["vs_dpo"]
            ax.scatter([i] * len(vs["diffs"]), vs["diffs"], s=14, alpha=0.6)
            low, high = vs["ci95"]
            ax.errorbar(i + 0.15, vs["mean"], yerr=[[vs["mean"] - low], [high - vs["mean"]]],
                        fmt="o", color="black", capsize=3)  # fmt: skip
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(arms)), [r["arm"] for r in arms], rotation=20, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("eval accuracy − DPO's, same seed")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shaping(path: Path, cache: Path, tokenizer_path: str, gamma: float, pairs: int) -> None:
    """Token-level shaping terms F_t = γΦ(s_{t+1}) − Φ(s_t) (centred Φ, terminal 0) of the first
    test pairs, chosen and rejected, for each potential kind (like the paper's figure)."""
    import matplotlib
    import pyarrow.parquet as pq

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tvkd_ray.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    entries = []
    for entry in sorted(cache.glob("eval-*")):
        teacher = teacher_setting(entry)
        if teacher is not None and not teacher["streams"]:  # one entry per potential
            table = pq.read_table(entry / "data").sort_by(schema.PAIR_ID)
            entries.append((teacher["potential"], table))
    fig, axes = plt.subplots(
        pairs, len(entries), figsize=(7 * len(entries), 2.6 * pairs), squeeze=False
    )
    for col, (kind, table) in enumerate(entries):
        for row in range(min(pairs, table.num_rows)):
            ax = axes[row][col]
            for side, column, colour in figures.SIDES:
                _, shaped = figures.shaping_terms(table[column][row].as_py(), gamma, center=True)
                ax.plot(shaped, color=colour, lw=1, label=f"{side} (S={shaped.sum():.2f})")
            ids = table[schema.CHOSEN_IDS][row].as_py()[:12]
            ax.set_title(
                f"{kind}, test pair {table[schema.PAIR_ID][row].as_py()}: chosen starts "
                f"{tokenizer.decode(ids)!r}"[:110],
                fontsize=8,
            )
            ax.set_xlabel("response token t")
            ax.set_ylabel("F_t")
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    """The command line, checked; ``hh_arms`` and ``bundled_arms`` hold the arms to run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("~/tvkd-ray-outputs/experiment"))
    parser.add_argument("--seeds", type=int, default=5, help="seeds of each HH-RLHF arm")
    parser.add_argument(
        "--bundled-seeds", type=int, default=3, help="seeds of each bundled-data arm"
    )
    parser.add_argument("--lanes", type=int, default=2, help="training runs at a time")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--docs", action="store_true", help="also write docs/results/")
    parser.add_argument(
        "--arms",
        help=f"comma-separated arms to run (default all: {', '.join(HH_ARMS)}); runs that "
        "finished are kept, so a later call with more arms adds to the same report",
    )
    parser.add_argument(
        "--extra-eval",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="pairs file (SPEC §4) every student's final model is also scored on, by "
        "jobs/eval.py against its SFT start; one table column per file (repeatable)",
    )
    args = parser.parse_args()
    chosen = args.arms.split(",") if args.arms else list(HH_ARMS)
    unknown = sorted(set(chosen) - set(HH_ARMS))
    if unknown or "dpo" not in chosen:
        parser.error(f"--arms: needs dpo (the baseline); unknown {unknown}; known {list(HH_ARMS)}")
    args.hh_arms = {k: v for k, v in HH_ARMS.items() if k in chosen}
    args.bundled_arms = {k: v for k, v in BUNDLED_ARMS.items() if k in chosen}
    for path in args.extra_eval:
        if not path.is_file():
            parser.error(f"--extra-eval: {path} is not a file")
    names = [path.name for path in args.extra_eval]
    if len(set(names)) < len(names):
        parser.error(f"--extra-eval: two files share a name (the table's column): {names}")
    args.extra_eval = [path.resolve() for path in args.extra_eval]
    return args


def schedule(lanes: Lanes, runner: Runner, data: dict, plan: Plan, args, cache: Path) -> None:
    """Every run of the experiment, each after the runs it needs. The teacher's DPO takes
    longest: what does not need it (the students' SFT, the DPO arms, the bundled arms with the
    untrained teacher) runs in the other lane meanwhile."""
    teacher = [
        f"data.train_path={data['hh_teacher']}",
        f"data.eval_path={data['hh_eval']}",
        f"train.epochs={plan.teacher_epochs}",
    ]
    lanes.add("hh-teacher-dpo", lambda: runner.train(TEACHER_RUN, TEACHER, teacher, True))
    for prefix in ("hh", "bundled"):
        name = f"{prefix}-student-sft"
        train, evaluation = data[f"{prefix}_train"], data[f"{prefix}_eval"]
        overrides = [f"data.train_path={train}", f"data.eval_path={evaluation}"]
        lanes.add(name, lambda n=name, o=overrides: runner.train(n, SFT, o, keep_model=True))
    settings = {
        "hh": (args.hh_arms, args.seeds, str(runner.runs / TEACHER_RUN / "model")),
        "bundled": (args.bundled_arms, args.bundled_seeds, "smollm2-135m-instruct"),
    }
    planned = []
    for prefix, (arms, seeds, teacher_path) in settings.items():
        common = [
            f"student.model={runner.runs / f'{prefix}-student-sft' / 'model'}",
            f"teacher.model={teacher_path}",
            f"teacher.cache={cache / prefix}",
            f"reference.cache={cache / prefix}",  # the same entries: one per teacher setting
            f"data.train_path={data[f'{prefix}_train']}",
            f"data.eval_path={data[f'{prefix}_eval']}",
            f"train.epochs={plan.student_epochs}",
        ]
        for name, overrides, first in student_runs(prefix, arms, seeds, common):
            needs_teacher = prefix == "hh" and "run.stage=dpo" not in overrides
            after = [f"{prefix}-student-sft"] + ([TEACHER_RUN] if needs_teacher else [])
            # Runs sharing a cache entry wait for the one that fills it.
            seed = int(name.rsplit("-s", 1)[1])
            planned.append((needs_teacher, first is not None, seed, name, overrides, after, first))
    # Runs without the DPO teacher first; in each group, the runs that fill the cache entries,
    # then seed by seed, so that an experiment stopped early still has every arm at the same seeds.
    for *_, name, overrides, after, first in sorted(planned, key=lambda p: p[:3]):
        lanes.add(
            name,
            lambda n=name, o=overrides: runner.train(n, STUDENT, o, keep_model=False),
            after=after if first is None else [*after, first],
        )


def write_report(report: Path, summary: dict, teacher_model: Path, cache: Path) -> str:
    """experiment.json, tables.md and the two plots under ``report``; the tables."""
    report.mkdir(exist_ok=True)
    (report / "experiment.json").write_text(json.dumps(summary, indent=1))
    hh_rows, b_rows = summary["hh"], summary["bundled"]
    tables = (
        f"### HH-RLHF harmless, test split ({summary['plan']['test_pairs']} pairs)\n\n"
        f"{markdown_table(hh_rows)}\n\n"
        f"### Bundled eval set, against its ground truth\n\n{markdown_table(b_rows)}\n"
    )
    (report / "tables.md").write_text(tables)
    plot_paired(
        report / "paired_accuracy.png",
        [("HH-RLHF harmless, test split", hh_rows), ("bundled, ground truth", b_rows)],
    )
    plot_shaping(report / "shaping_terms.png", cache / "hh", str(teacher_model), 0.9, pairs=3)
    return tables


def main() -> int:
    args = parse_args()
    plan = SMOKE if args.smoke else FULL
    out = args.out.expanduser().resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    data = split_data(out, plan)
    first_start = out / "started_at"  # the wall time counts from the first invocation
    if not first_start.exists():
        first_start.write_text(str(started))
    runner = Runner(out, args.extra_eval)
    unscored = runner.unscored()
    if unscored:
        sys.exit(
            f"error: --extra-eval: {len(unscored)} finished runs have no score on a file and "
            f"no model left to score (e.g. {unscored[0]}); remove their directories under "
            f"{runner.runs} to train them again, or drop the file"
        )
    cache = out / "teacher-cache"
    lanes = Lanes(args.lanes)
    schedule(lanes, runner, data, plan, args, cache)
    results = lanes.results()
    teacher, teacher_model = results[TEACHER_RUN], runner.runs / TEACHER_RUN / "model"
    signal = {
        "teacher_dpo_eval_accuracy": teacher["eval/rewards/accuracies"][-1][1],
        "teacher_dpo_eval_margin": teacher["eval/rewards/margins"][-1][1],
        "hh": teacher_signal(cache / "hh"),
        "bundled": teacher_signal(cache / "bundled"),
        "bounded_support": support_difference(str(teacher_model), data["hh_eval"]),
    }
    log(f"teacher signal: {json.dumps(signal)}")
    students = [r for name, r in results.items() if is_student_run(name)]
    summary = {
        "plan": plan.__dict__,
        "seeds": {"hh": args.seeds, "bundled": args.bundled_seeds},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "wall_seconds": round(time.time() - float(first_start.read_text())),
        "run_seconds_total": round(sum(r["seconds"] for r in results.values())),
        "teacher_signal": signal,
        "hh": summarise(students, args.hh_arms, args.seeds, "hh"),
        "bundled": summarise(students, args.bundled_arms, args.bundled_seeds, "bundled"),
        "runs": list(results.values()),
    }
    report = out / "report"
    print(write_report(report, summary, teacher_model, cache))
    if args.docs:
        target = REPO / "docs" / "results"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("experiment.json", "tables.md", "paired_accuracy.png", "shaping_terms.png"):
            shutil.copy(report / name, target / name)
    log(f"finished in {time.time() - started:.0f} s; report in {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
