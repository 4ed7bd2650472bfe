"""The quality experiment's bookkeeping (examples/experiments/run.py): the teacher-signal figures
read from a teacher cache entry, the per-arm summaries paired by seed, the order runs start in
and the extra evaluations. The training runs it drives are the CLI's, tested elsewhere."""

import concurrent.futures
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "experiments"))

import run as experiment  # noqa: E402

from tvkd_ray import schema  # noqa: E402


def cache_entry(root: Path, name: str, potential: dict | None, chosen, rejected) -> None:
    """A cache entry as the pipeline writes it: Parquet rows and the fingerprint parts."""
    (root / name / "data").mkdir(parents=True)
    table = pa.table(
        {
            "pair_id": list(range(len(chosen))),
            "chosen_ids": [[1] * len(p) for p in chosen],
            "rejected_ids": [[1] * len(p) for p in rejected],
            schema.CHOSEN_POTENTIALS: chosen,
            schema.REJECTED_POTENTIALS: rejected,
        }
    )
    pq.write_table(table, root / name / "data" / "part-0.parquet")
    parts = {"reference": "{}"} if potential is None else {"teacher": json.dumps(potential)}
    (root / name / "_fingerprint.json").write_text(json.dumps(parts))


def test_teacher_signal_compares_summed_centred_potentials(tmp_path):
    # Pair 0: chosen sums (0 + 1 + 2) = 3 after centring, rejected (0 + -1) = -1: teacher agrees.
    # Pair 1: centring removes the offset of 10, so chosen 0 < rejected 0.5: teacher disagrees.
    # Pair 2: the same values: a tie, counted as not agreeing.
    chosen = [[1.0, 2.0, 3.0], [10.0, 10.0], [0.0, 1.0]]
    rejected = [[1.0, 0.0], [0.0, 0.5], [0.0, 1.0]]
    # The teacher's spec as its fingerprint part records it (fields an entry is keyed on).
    implicit = {"potential": "implicit_reward", "tau": 1.0, "q_scale": 1.0, "top_k": 0}
    no_teacher = None  # an entry of a DPO run: reference log-probs only
    cache_entry(tmp_path, "eval-a", implicit, chosen, rejected)
    cache_entry(tmp_path, "eval-b", no_teacher, chosen, rejected)
    cache_entry(tmp_path, "train-c", implicit, chosen, rejected)

    (row,) = experiment.teacher_signal(tmp_path, gamma=0.9)  # eval entries with a teacher only
    assert row["potential"] == "implicit_reward" and row["pairs"] == 3
    assert row["chosen_larger_sum"] == pytest.approx(1 / 3)
    assert row["ties"] == pytest.approx(1 / 3)
    assert row["chosen_longer"] == pytest.approx(1 / 3) and row["rejected_longer"] == 0
    # Per-token means of the centred potentials: 1 vs -0.5, 0 vs 0.25, 0.5 vs 0.5.
    assert row["chosen_larger_mean"] == pytest.approx(1 / 3)
    # |(1 - γ) · (ΣΦ⁺ − ΣΦ⁻)| per pair: 0.4, 0.05, 0.0 -> median 0.05.
    assert row["offset_per_alpha_median_abs"] == pytest.approx(0.05)


def test_summaries_pair_each_arm_with_dpo_by_seed():
    def run(name, accuracy, extra):
        return {
            "name": name,
            "eval/rewards/accuracies": [(32, accuracy)],
            "eval/rewards/margins": [(32, accuracy / 2)],
            "eval/loss": [(32, 0.5)],
            "extra_eval": {"holdout.jsonl": {"preference_accuracy": extra}},
        }

    seeds = [(0.6, 0.7, 0.5, 0.7), (0.8, 0.6, 0.7, 0.5), (0.7, 0.7, 0.6, 0.8)]
    results = []
    for s, (dpo, tvkd, dpo_extra, tvkd_extra) in enumerate(seeds):
        results += [run(f"hh-dpo-s{s}", dpo, dpo_extra), run(f"hh-tvkd-s{s}", tvkd, tvkd_extra)]
    rows = experiment.summarise(results, {"dpo": [], "tvkd": []}, seeds=3, prefix="hh")
    dpo, tvkd = rows
    assert dpo["eval/rewards/accuracies"]["mean"] == pytest.approx(0.7)
    assert dpo["eval/rewards/accuracies"]["std"] == pytest.approx(0.1)
    # Same-seed differences +0.1, −0.2, 0.0: one win, one loss, one tie.
    vs = tvkd["vs_dpo"]
    assert vs["diffs"] == pytest.approx([0.1, -0.2, 0.0])
    assert vs["mean"] == pytest.approx(-1 / 30)
    assert (vs["wins"], vs["losses"], vs["sign_test_p"]) == (1, 1, 1.0)
    assert -0.2 - 1e-9 <= vs["ci95"][0] < vs["mean"] < vs["ci95"][1] <= 0.1 + 1e-9
    assert dpo["vs_dpo"]["diffs"] == [0.0, 0.0, 0.0]
    extra = tvkd["extra_eval"]["holdout.jsonl"]
    assert extra["values"] == [0.7, 0.5, 0.8] and extra["vs_dpo"]["wins"] == 2
    table = experiment.markdown_table(rows)
    assert "| tvkd | 0.667 ± 0.058 | -0.033 [" in table
    assert "accuracy on holdout.jsonl (vs DPO) |" in table.splitlines()[0]
    assert table.splitlines()[-1].endswith("| 0.667 ± 0.153 (+0.067) |")


def test_sign_test_of_five_wins():
    vs = experiment.paired([0.7] * 5, [0.6] * 5)
    assert (vs["wins"], vs["losses"]) == (5, 0)
    assert vs["sign_test_p"] == pytest.approx(2 / 32)  # two-sided: both all-win and all-loss


def test_lanes_start_a_run_only_after_the_runs_it_waits_for():
    events = []

    def job(name, seconds=0.0):
        def run():
            events.append(("start", name))
            time.sleep(seconds)
            events.append(("end", name))
            return name

        return run

    lanes = experiment.Lanes(2)
    lanes.add("teacher", job("teacher", 0.3))
    lanes.add("sft", job("sft"))
    lanes.add("dpo-s0", job("dpo-s0"), after=["sft"])
    lanes.add("tvkd-s0", job("tvkd-s0"), after=["sft", "teacher"])
    lanes.add("tvkd-s1", job("tvkd-s1"), after=["sft", "teacher", "tvkd-s0"])
    assert lanes.results() == {n: n for n in ("teacher", "sft", "dpo-s0", "tvkd-s0", "tvkd-s1")}
    # dpo-s0 did not wait for the teacher; the TVKD runs did, and s1 waited for s0.
    assert events.index(("start", "dpo-s0")) < events.index(("end", "teacher"))
    assert events.index(("end", "teacher")) < events.index(("start", "tvkd-s0"))
    assert events.index(("end", "tvkd-s0")) < events.index(("start", "tvkd-s1"))


def test_a_failed_run_stops_the_runs_that_wait_for_it():
    ran = []

    def fail():
        raise RuntimeError("run teacher failed")

    lanes = experiment.Lanes(2)
    lanes.add("teacher", fail)
    lanes.add("tvkd-s0", lambda: ran.append("tvkd-s0"), after=["teacher"])
    with pytest.raises(RuntimeError, match="run teacher failed"):
        lanes.results()
    assert ran == []


def test_a_failed_run_stops_the_queued_runs_of_its_own_lane():
    """One lane: the run queued behind the failed one waits for nothing, and the lane's thread
    takes it as soon as the failure is raised, before results() could cancel it."""
    ran = []

    def fail():
        raise RuntimeError("run bundled-dpo-s0 failed")

    lanes = experiment.Lanes(1)
    lanes.add("bundled-dpo-s0", fail)
    lanes.add("bundled-tvkd-s0", lambda: ran.append("bundled-tvkd-s0"))
    concurrent.futures.wait(lanes.futures.values())  # the lane has taken both
    with pytest.raises(RuntimeError, match="run bundled-dpo-s0 failed"):
        lanes.results()
    assert ran == []


def test_extra_eval_scores_the_final_model_against_its_sft_start(tmp_path):
    """``--extra-eval``: jobs/eval.py on the run's model, its reference the student's start,
    with the run's β and lengths."""
    from tvkd_ray.models import load_model, load_tokenizer, resolve_model

    holdout = tmp_path / "holdout.jsonl"
    rows = [{"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"}] * 3
    holdout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = experiment.Runner(tmp_path / "out", [holdout])
    model_dir = runner.runs / "hh-dpo-s0" / "model"
    load_model(resolve_model("tiny-student")).save_pretrained(model_dir)
    load_tokenizer(resolve_model("tiny-student")).save_pretrained(model_dir)
    start = resolve_model("tiny-student")
    overrides = [f"student.model={start}", "teacher.model=tiny-teacher", "loss.beta=0.2"]
    (scores,) = runner.score_extra("hh-dpo-s0", experiment.STUDENT, overrides, [holdout]).values()
    # The model is its own start: every margin is 0, a tie, never a win.
    assert scores["ref_model"] == start and scores["beta"] == 0.2
    assert scores["preference_accuracy"] == 0.0 and scores["mean_margin"] == pytest.approx(0.0)
    holdout.write_text("{not json\n")
    with pytest.raises(RuntimeError, match="run hh-dpo-s0: jobs/eval.py on .*holdout.jsonl"):
        runner.score_extra("hh-dpo-s0", experiment.STUDENT, overrides, [holdout])
    # A finished student run whose model is gone and that lacks a file's score is found first.
    (runner.runs / "hh-dpo-s1").mkdir()
    runner.done_file("hh-dpo-s1").write_text(json.dumps({"name": "hh-dpo-s1"}))
    assert runner.unscored() == ["hh-dpo-s1: holdout.jsonl"]
