"""The CLI: --help, --print-config, and bad input ending in one clear line without a traceback.

Every bad-input case here fails before Ray starts or a model loads, so the whole catalogue runs
in seconds of real CLI subprocesses.
"""

import gzip
import json
from pathlib import Path

import pytest
import yaml
from support import error_lines, run_cli, run_cli_cases

from tvkd_ray.config import field_docs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


def test_help_lists_every_field_with_its_doc():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for key, _typ, _default, help_text in field_docs():
        assert f"--{key}" in proc.stdout
        assert help_text.split()[0] in proc.stdout


def test_print_config_is_the_resolved_yaml():
    proc = run_cli(
        "--config", str(TINY), "--loss.alpha", "0.25", "--train.lr=3e-4", "--print-config"
    )
    assert proc.returncode == 0, proc.stderr
    tree = yaml.safe_load(proc.stdout)
    assert tree["loss"]["alpha"] == 0.25
    assert tree["train"]["lr"] == pytest.approx(3e-4)
    assert tree["student"]["model"] == "tiny-student"


def _pairs(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _padded_head_teacher(path: Path) -> str:
    """The tiny teacher's tokenizer on a model whose head has 16 padding rows more."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tvkd_ray.models import load_tokenizer, resolve_model

    config = AutoConfig.from_pretrained(resolve_model("tiny-teacher"))
    config.vocab_size += 16
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    load_tokenizer("tiny-teacher").save_pretrained(path)
    return str(path)


GOOD = {"prompt": "Q: 1+1?\nA:", "chosen": " 2", "rejected": " 3"}


def _catalogue(tmp: Path) -> list[tuple[list[str], str]]:
    """(extra CLI args, text the one-line error must contain)."""
    bad_json = tmp / "bad_json.jsonl"
    bad_json.write_text(json.dumps(GOOD) + "\n{not json\n")
    bad_gz = tmp / "bad.jsonl.gz"
    bad_gz.write_bytes(b"this is not gzip")
    latin = tmp / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    hh = tmp / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}) + "\n")
    conv = tmp / "conv.jsonl"
    conv.write_text(
        json.dumps(
            {
                "chosen": [{"role": "user", "content": "hi"}],
                "rejected": [{"role": "user", "content": "yo"}],
            }
        )
        + "\n"
    )
    conversation = [{"role": "user", "content": "hi"}]
    chat = _pairs(
        tmp / "chat.jsonl",
        [
            {
                "chosen": [*conversation, {"role": "assistant", "content": "hello"}],
                "rejected": [*conversation, {"role": "assistant", "content": "go away"}],
            }
        ],
    )
    with gzip.open(tmp / "ok_hh.jsonl.gz", "wt") as f:
        f.write(
            json.dumps(
                {
                    "chosen": "\n\nHuman: hi\n\nAssistant: hello",
                    "rejected": "\n\nHuman: hi\n\nAssistant: go away",
                }
            )
            + "\n"
        )
    padded = _padded_head_teacher(tmp / "padded-teacher")
    cases = [
        (["--loss.alpah", "0.1"], "unknown config key 'loss.alpah' (did you mean 'loss.alpha'?)"),
        (["--train.batch_size", "four"], "train.batch_size: expected int"),
        (["--loss.gamma", "2"], "loss.gamma: must be in [0, 1]"),
        (["--loss.alpha", "-1"], "loss.alpha: must be >= 0"),
        (["--loss.potential", "implicit_reward"], "teacher.ref_model"),
        (["--run.stage", "tvkd", "--teacher.model", "null"], "teacher.model"),
        (["--bogus"], "unexpected argument '--bogus'"),
        (["--teacher.resources", "{GPU: 1}"], "teacher.resources.GPU: set it with teacher.num"),
        (["--teacher.resources", "{scorer: 1}"], "0 of resource 'scorer' but the run needs 1"),
        (["--config", str(tmp / "nope.yaml")], "cannot read config file"),
        (["--student.model", str(tmp / "no-such-model")], "no-such-model"),
        # A teacher with its own tokenizer is mapped (SPEC §2.3c), but top-k KD cannot be.
        (
            ["--teacher.model", "smollm2-135m-instruct", "--loss.kd_weight", "0.1"],
            "loss.kd_weight: top-k KD needs one vocabulary, but teacher tokenizer "
            "'smollm2-135m-instruct' and student tokenizer 'tiny-student' differ",
        ),
        (
            ["--teacher.model", "smollm2-135m-instruct", "--loss.objective", "release"],
            "loss.objective: release scores the student on the teacher's top-k ids, which needs "
            "one vocabulary, but teacher tokenizer 'smollm2-135m-instruct' and student",
        ),
        (["--loss.objective", "release", "--run.stage", "dpo"], "so run.stage must be tvkd"),
        (["--loss.objective", "reinforce"], "loss.objective: must be one of tvkd | release"),
        (
            ["--loss.potential_normalize", "false", "--loss.potential_support", "top_k"],
            "loss.potential_support: top_k sums probabilities into a rest bucket, so it needs "
            "loss.potential_normalize=true",
        ),
        # One tokenizer on a head padded to more rows: the top-k ids would overrun the student's.
        (
            ["--teacher.model", padded, "--loss.objective", "release"],
            "the teacher's head has 1040 rows and the student's 1024",
        ),
        (
            ["--loss.kd_weight", "0.1", "--teacher.top_k", "5000"],
            "teacher.top_k: 5000 must be smaller than the teacher's vocabulary",
        ),
        (
            [
                "--loss.potential",
                "implicit_reward",
                "--loss.potential_support",
                "top_k",
                "--teacher.ref_model",
                "tiny-teacher",
            ],
            "loss.potential_support: top_k is the support of the soft_value potential",
        ),
        (["--reference.model", "smollm2-135m-instruct"], "must share one tokenizer"),
        # Both models score one rendered text: their chat templates must render it alike.
        (
            ["--teacher.model", "smollm2-135m-instruct", "--data.train_path", chat],
            "teacher tokenizer 'smollm2-135m-instruct' and student tokenizer 'tiny-student' "
            "render them differently",
        ),
        (["--data.train_path", str(tmp / "missing.jsonl")], "missing.jsonl"),
        (
            [
                "--data.train_path",
                _pairs(tmp / "missing_field.jsonl", [GOOD, {"prompt": "x", "chosen": "y"}]),
            ],
            "line 2, field 'rejected'",
        ),
        (
            ["--data.train_path", _pairs(tmp / "wrong_type.jsonl", [{**GOOD, "chosen": 5}])],
            "line 1, field 'chosen'",
        ),
        (
            [
                "--data.train_path",
                _pairs(tmp / "empty_resp.jsonl", [GOOD, {**GOOD, "rejected": "   "}]),
            ],
            "line 2, field 'rejected'",
        ),
        (
            [
                "--data.train_path",
                _pairs(tmp / "same.jsonl", [{**GOOD, "rejected": GOOD["chosen"]}]),
            ],
            "line 1",
        ),
        (["--data.train_path", str(bad_json)], "line 2"),
        (["--data.train_path", str(bad_gz)], "bad.jsonl.gz"),
        (["--data.train_path", str(latin)], "line 2"),
        (["--data.train_path", str(empty)], "empty.jsonl"),
        (["--data.train_path", str(hh), "--data.format", "implicit_prompt"], "hh.jsonl"),
        (["--data.train_path", str(conv)], "conv.jsonl"),
        (["--data.eval_path", str(tmp / "ok_hh.jsonl.gz")], "format"),  # eval format differs
        (
            ["--student.lora", "{target_modules: [qkv_proj]}"],
            "student.lora.target_modules: the student has no module named 'qkv_proj'",
        ),
        (["--student.lora.r", "8", "--train.strategy", "fsdp"], "student.lora: LoRA trains"),
        (
            ["--teacher.attn_implementation", "flash_attention_2"],
            "flash_attention_2 runs on CUDA only",
        ),
        (["--teacher.device_map", "{lm_head: cpu}"], "teacher.device_map: gives no device to"),
    ]
    return cases


def test_bad_input_catalogue_one_line_no_traceback(tmp_path):
    catalogue = _catalogue(tmp_path)
    common = ["--config", str(TINY), "--run.output_dir", str(tmp_path / "out")]
    common += ["--tracking.enabled", "false"]
    results = run_cli_cases([[*common, *extra] for extra, _ in catalogue])
    failures = []
    for (extra, expected), proc in zip(catalogue, results, strict=True):
        lines = error_lines(proc)
        problem = None
        if proc.returncode != 2:
            problem = f"exit {proc.returncode}"
        elif "Traceback" in proc.stderr + proc.stdout:
            problem = "traceback printed"
        elif len(lines) != 1 or expected not in lines[0]:
            problem = f"message {lines!r} lacks {expected!r}"
        if problem:
            failures.append(f"{extra}: {problem}\n{proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert len(catalogue) >= 15


def test_a_bad_input_in_a_real_shell_is_one_line_and_exit_2(tmp_path):
    """The catalogue runs in one process; one case as its own ``python jobs/tvkd.py``."""
    proc = run_cli("--config", str(TINY), "--train.batch_size", "four")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "train.batch_size: expected int" in line


def test_a_finished_run_only_says_so(tmp_path):
    """Rerunning a run whose directory holds its result trains nothing, starts no cluster and
    says how to start a fresh one (a full run ending this way: test_train_on_cpu, make test-e2e)."""
    from driver.fit import RESULT_FILE

    run_dir = tmp_path / "out" / "tiny"
    run_dir.mkdir(parents=True)
    result = {
        "metrics": {"loss": 0.5},
        "model_dir": str(run_dir / "model"),
        "run_dir": str(run_dir),
    }
    result |= {"checkpoint_dir": None, "mlflow_run_id": None, "tracking_uri": None}
    (run_dir / RESULT_FILE).write_text(json.dumps(result))
    proc = run_cli("--config", str(TINY), "--run.output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already finished" in proc.stderr and "run.overwrite=true" in proc.stderr
    assert (
        "[tvkd] run " not in proc.stdout and "loss                        : 0.5000" in proc.stdout
    )
