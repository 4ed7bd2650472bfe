"""jobs/eval.py on the tiny models: implicit-reward ranking, multiple choice, and its CLI.

The tiny presets are randomly initialised, so "the model prefers X" is made true by construction:
X is the model's own greedy continuation, restricted to whole-word tokens so that the text
re-encodes to exactly the greedy tokens.
"""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.eval import (
    load_multiple_choice,
    main,
    multiple_choice_accuracy,
    preference_scores,
    reward_margins,
)
from tvkd_ray.data import load_pairs, tokenize_batch
from tvkd_ray.errors import DataError
from tvkd_ray.models import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "jobs" / "eval.py"
HELLASWAG = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"

TASKS = ["bake bread", "fix a bike", "plant a tree", "save money", "learn math", "write a letter"]
PROMPTS = [f"\n\nHuman: How do I {task}?\n\nAssistant:" for task in TASKS]
RESPONSES = [
    (" Sure, here is how. Start with small steps.", " I can't help with that."),
    (" Check the chain first.", " Yes!"),
    (" Dig a hole twice as wide as the roots.", " The cat likes the red car."),
    (" Spend less than you earn, 12% less.", " No."),
    (" Practice a few problems every day.", " Math is hard; ask someone else."),
    (" Start with the date and a greeting.", " Letters are old-fashioned."),
]
LENGTHS = {"max_length": 64, "max_prompt_length": 32}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-teacher")


@pytest.fixture(scope="module")
def teacher():
    return load_model("tiny-teacher").eval()


@pytest.fixture(scope="module")
def student():
    return load_model("tiny-student").eval()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _standard_rows(swap: bool = False) -> list[dict]:
    return [
        {"prompt": p, "chosen": r if swap else c, "rejected": c if swap else r}
        for p, (c, r) in zip(PROMPTS, RESPONSES)
    ]


def _sequence_logp(model, prompt: list[int], response: list[int]) -> float:
    """Independent oracle: log π(response | prompt) from one plain forward over the full logits."""
    ids = torch.tensor([prompt + response])
    with torch.inference_mode():
        logps = model(ids).logits[0, :-1].log_softmax(-1)
    token_logps = logps.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt) - 1 :].sum().item()


def _word_ids(tokenizer) -> torch.Tensor:
    """Mask of tokens that are one space plus lowercase letters: they re-encode to themselves."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([re.fullmatch(r"Ġ[a-z]+", token) is not None for token in tokens])


def _greedy_words(model, tokenizer, context: str, num_tokens: int = 8) -> str:
    """The model's greedy continuation of ``context`` among whole-word tokens."""
    allowed = _word_ids(tokenizer)
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    new = []
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids + new])).logits[0, -1]
            new.append(int(logits.masked_fill(~allowed, float("-inf")).argmax()))
    text = tokenizer.decode(new)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == new  # precondition
    return text


def _random_words(tokenizer, rng: random.Random, num_tokens: int = 8) -> str:
    words = _word_ids(tokenizer).nonzero()[:, 0].tolist()
    return tokenizer.decode(rng.sample(words, num_tokens))


# ------------------------------------------------------------------------------- preference


def test_cli_swapped_pairs_flip_the_ranking(tmp_path, teacher, student, tokenizer):
    invalid = {"prompt": PROMPTS[0], "chosen": " Same.", "rejected": " Same."}
    swapped = _write(tmp_path / "swapped.jsonl", [*_standard_rows(swap=True), invalid])
    options = "--ref-model tiny-student --beta 0.5 --max-length 64 --max-prompt-length 32"
    proc = subprocess.Popen(  # runs while the in-process reference below is computed
        [sys.executable, str(EVAL), "--model", "tiny-teacher", "--data", str(swapped)]
        + [*options.split(), "--batch-size", "4"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    table = load_pairs(_write(tmp_path / "pairs.jsonl", _standard_rows())).table
    expected = preference_scores(teacher, student, tokenizer, table, beta=0.5, **LENGTHS)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == expected["n"] == len(PROMPTS)
    assert result["skipped"] == {"identical_responses": 1}
    assert (result["model"], result["ref_model"], result["beta"]) == (
        "tiny-teacher",
        "tiny-student",
        0.5,
    )
    assert 0 < expected["preference_accuracy"] < 1  # both outcomes occur, so a flip is visible
    assert result["preference_accuracy"] == pytest.approx(1 - expected["preference_accuracy"])
    assert result["mean_margin"] == pytest.approx(-expected["mean_margin"], rel=1e-5)


@pytest.mark.parametrize("with_ref", [True, False])
def test_margins_are_the_implicit_reward_and_negate_when_swapped(
    tmp_path, teacher, student, tokenizer, with_ref
):
    ref = student if with_ref else None
    tokens = [
        tokenize_batch(
            load_pairs(_write(tmp_path / f"{swap}.jsonl", _standard_rows(swap))).table,
            tokenizer,
            **LENGTHS,
        )
        for swap in (False, True)
    ]
    pad = tokenizer.pad_token_id
    margins = reward_margins(teacher, ref, tokens[0], pad, beta=0.2, batch_size=4)
    swapped = reward_margins(teacher, ref, tokens[1], pad, beta=0.2, batch_size=4)
    assert (margins != 0).all()
    assert swapped == pytest.approx(-margins, abs=1e-6)
    # Padding in a batch must not change a pair's score.
    assert reward_margins(teacher, ref, tokens[0], pad, beta=0.2, batch_size=1) == pytest.approx(
        margins, abs=1e-5
    )
    row = tokens[0].slice(2, 1).to_pylist()[0]
    prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
    expected = _sequence_logp(teacher, prompt, chosen) - _sequence_logp(teacher, prompt, rejected)
    if with_ref:
        ref_margin = _sequence_logp(student, prompt, chosen) - _sequence_logp(
            student, prompt, rejected
        )
        expected = 0.2 * (expected - ref_margin)
    assert margins[2] == pytest.approx(expected, abs=1e-4)


def test_chosen_the_model_would_generate_ranks_first(capsys, tmp_path, teacher, tokenizer):
    rng = random.Random(0)
    rows = [
        {
            "prompt": p,
            "chosen": _greedy_words(teacher, tokenizer, p),
            "rejected": _random_words(tokenizer, rng),
        }
        for p in PROMPTS
    ]
    path = _write(tmp_path / "greedy.jsonl", rows)
    assert main(["--model", "tiny-teacher", "--data", str(path)]) == 0
    own = json.loads(capsys.readouterr().out)
    assert (own["preference_accuracy"], own["n"], own["ref_model"], own["beta"]) == (
        1.0,
        len(PROMPTS),
        None,
        None,
    )
    assert own["mean_margin"] > 0
    swapped = load_pairs(path).table.select(["pair_id", "prompt", "rejected", "chosen"])
    swapped = swapped.rename_columns(["pair_id", "prompt", "chosen", "rejected"])
    scores = preference_scores(teacher, None, tokenizer, swapped)
    assert (scores["preference_accuracy"], scores["mean_margin"]) == (
        0.0,
        pytest.approx(-own["mean_margin"], rel=1e-5),
    )


def test_standard_and_hh_files_give_the_same_scores(tmp_path, teacher, student, tokenizer):
    hh_rows = [
        {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        for row in _standard_rows()
    ]
    standard = load_pairs(_write(tmp_path / "standard.jsonl", _standard_rows()))
    hh = load_pairs(_write(tmp_path / "hh.jsonl", hh_rows))
    assert (standard.format, hh.format) == ("standard", "implicit_prompt")
    scores = [
        preference_scores(teacher, student, tokenizer, loaded.table, **LENGTHS)
        for loaded in (standard, hh)
    ]
    assert scores[0] == scores[1]


# -------------------------------------------------------------------------- multiple choice


def test_multiple_choice_fixture_and_the_models_own_continuation(teacher, tokenizer):
    items = load_multiple_choice(HELLASWAG)
    fixture = multiple_choice_accuracy(teacher, tokenizer, items, batch_size=4)
    assert fixture["n"] == len(items) == 6
    assert 0 <= fixture["accuracy"] <= 1
    constructed = []
    for label, item in enumerate(items[:4]):
        endings = [text for i, text in enumerate(item["endings"]) if i != item["label"]][:3]
        endings.insert(label, _greedy_words(teacher, tokenizer, item["ctx"]).lstrip())
        constructed.append({"ctx": item["ctx"], "endings": endings, "label": label})
    assert multiple_choice_accuracy(teacher, tokenizer, constructed) == {
        "accuracy": 1.0,
        "n": 4,
        "truncated": 0,
    }


def test_multiple_choice_cuts_long_contexts_from_the_left(teacher, tokenizer):
    item = {
        "ctx": "A long story. " * 40,
        "endings": ["It ends well.", "It ends badly."],
        "label": 0,
    }
    result = multiple_choice_accuracy(teacher, tokenizer, [item], max_length=16)
    assert (result["n"], result["truncated"]) == (1, 1)


# ------------------------------------------------------------------------------------- CLI
# One real subprocess (the flip test above) covers the script; the rest call main() in-process,
# which is everything the script runs, without paying for another interpreter start.


def test_main_multiple_choice_prints_one_json_object(capsys, teacher, tokenizer):
    assert (
        main(["--task", "multiple_choice", "--model", "tiny-teacher", "--data", str(HELLASWAG)])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    expected = multiple_choice_accuracy(teacher, tokenizer, load_multiple_choice(HELLASWAG))
    assert (result["task"], result["accuracy"], result["n"]) == (
        "multiple_choice",
        expected["accuracy"],
        6,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing.jsonl"], "missing.jsonl: file not found"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--task", "multiple_choice", "--data", "{tmp}/bad.jsonl"], "line 2, field 'label'"),
        (["--task", "multiple_choice", "--data", "{tmp}/missing.jsonl"], "file not found"),
        (["--ref-model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--max-prompt-length", "300"], "--max-prompt-length must be in"),
        (["--nonsense"], "unrecognized arguments: --nonsense"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(capsys, tmp_path, args, message):
    _write(
        tmp_path / "bad.jsonl",
        [
            {"ctx": "A cat", "endings": ["sleeps.", "flies."], "label": 0},
            {"ctx": "A dog", "endings": ["barks.", "sings."], "label": 5},
        ],
    )
    defaults = {"--model": "tiny-teacher", "--data": str(HELLASWAG)}
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        main(["--debug", "--model", "tiny-teacher", "--data", str(tmp_path / "missing.jsonl")])
