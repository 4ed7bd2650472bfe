"""Preference data: readers x formats, validation, tokenisation, collate, bundled dataset."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy  # noqa: E402
import gzip  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tvkd_ray import schema  # noqa: E402
from tvkd_ray.data import (  # noqa: E402
    HH_ASSISTANT,
    collate,
    load_pairs,
    tokenize_batch,
    tokenize_dataset,
    truncation_counts,
)
from tvkd_ray.errors import DataError  # noqa: E402
from tvkd_ray.models import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HH_PAIRS = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless/pairs.jsonl.gz"
BUNDLED = REPO / "examples" / "data" / "bundled"
HH_EMPTY_CHOSEN_IDS = [86, 516, 925, 1103]  # rows whose chosen reply is a bare " " in the data


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hh_path():
    if not HH_PAIRS.exists():
        pytest.skip(f"{HH_PAIRS} is not present")
    return HH_PAIRS


# ------------------------------------------------------------------------------------- fixtures

STANDARD_ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": " 4.", "rejected": " 5.", "task": "math"},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No.", "task": "polite"},
]
STANDARD_EXPECTED = [(r["prompt"], r["chosen"], r["rejected"]) for r in STANDARD_ROWS]

IMPLICIT_ROWS = [
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sus.",
    },
    {  # the responses share a prefix beyond the marker; the prompt still ends at the marker
        "chosen": "\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
        "rejected": "\n\nHuman: Name a fruit.\n\nAssistant: A brick.",
    },
]
IMPLICIT_EXPECTED = [
    ("\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant:", " Sure.", " Sus."),
    ("\n\nHuman: Name a fruit.\n\nAssistant:", " An apple.", " A brick."),
]


def _msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONAL_ROWS = [
    {  # explicit prompt
        "prompt": [_msg("user", "Hi")],
        "chosen": [_msg("assistant", "Hello!")],
        "rejected": [_msg("assistant", "Go away.")],
    },
    {  # implicit prompt: the shared message prefix
        "prompt": None,
        "chosen": [_msg("system", "Be kind."), _msg("user", "Help?"), _msg("assistant", "Yes.")],
        "rejected": [_msg("system", "Be kind."), _msg("user", "Help?"), _msg("assistant", "No.")],
    },
]
CONVERSATIONAL_EXPECTED = [  # rendered with the tiny ChatML template, EOS (<|im_end|>) stripped
    ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello!", "Go away."),
    (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHelp?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "Yes.",
        "No.",
    ),
]
FORMATS = {
    "standard": (STANDARD_ROWS, STANDARD_EXPECTED),
    "implicit_prompt": (IMPLICIT_ROWS, IMPLICIT_EXPECTED),
    "conversational": (CONVERSATIONAL_ROWS, CONVERSATIONAL_EXPECTED),
}
READERS = ["jsonl", "jsonl.gz", "parquet", "hf_dir", "ray"]


def _jsonl_bytes(rows):
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def _write(tmp_path, reader, rows):
    """Write ``rows`` as the given source kind; return what load_pairs takes."""
    if reader == "jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_bytes(_jsonl_bytes(rows))
        return path
    if reader == "jsonl.gz":
        path = tmp_path / "pairs.jsonl.gz"
        path.write_bytes(gzip.compress(_jsonl_bytes(rows)))
        return path
    if reader == "parquet":
        path = tmp_path / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if reader == "hf_dir":
        path = tmp_path / "pairs_hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        return path
    import ray.data

    return ray.data.from_items(rows)


# -------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_and_format(tmp_path, request, tiny, reader, fmt):
    if reader == "ray":
        request.getfixturevalue("ray_cluster")
    rows, expected = FORMATS[fmt]
    source = _write(tmp_path, reader, rows)
    loaded = load_pairs(source, tokenizer=tiny)
    assert loaded.format == fmt
    assert loaded.skipped == {}
    assert loaded.table.schema == schema.PAIRS
    assert loaded.table.column("pair_id").to_pylist() == [0, 1]
    got = list(zip(*(loaded.table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected"))))
    assert got == expected
    # Naming the format explicitly gives the same table.
    assert load_pairs(source, format=fmt, tokenizer=tiny).table.equals(loaded.table)


def test_ray_dataset_keeps_its_pair_id(ray_cluster):
    import ray.data

    rows = [dict(row, pair_id=pid) for row, pid in zip(STANDARD_ROWS, [41, 7])]
    loaded = load_pairs(ray.data.from_items(rows))
    assert loaded.source == "ray.data.Dataset"
    assert loaded.table.column("pair_id").to_pylist() == [41, 7]


def test_jsonl_pair_id_is_the_line_index_and_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_bytes(
        b"\n" + _jsonl_bytes(STANDARD_ROWS[:1]) + b"  \n" + _jsonl_bytes(STANDARD_ROWS[1:])
    )
    assert load_pairs(path).table.column("pair_id").to_pylist() == [1, 3]


def test_conversational_with_the_smollm2_template(tmp_path, smollm2):
    row = CONVERSATIONAL_ROWS[0]
    table = load_pairs(_write(tmp_path, "jsonl", [row]), tokenizer=smollm2).table
    prompt, chosen, rejected = (
        table.column(c)[0].as_py() for c in ("prompt", "chosen", "rejected")
    )
    full = smollm2.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    # SmolLM2 injects its default system prompt; the response is what the template adds after it.
    assert "You are a helpful AI assistant named SmolLM" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert (chosen, rejected) == ("Hello!", "Go away.")
    assert prompt + chosen + smollm2.eos_token == full.rstrip()


def test_conversational_needs_a_tokenizer(tmp_path):
    source = _write(tmp_path, "jsonl", CONVERSATIONAL_ROWS)
    with pytest.raises(DataError, match=r"pairs\.jsonl: conversational rows .* pass a tokenizer"):
        load_pairs(source)


# ----------------------------------------------------------------------------- real HH-RLHF data


def test_hh_rlhf_harmless_pairs(hh_path):
    # Four pairs in the file have an empty chosen reply; by default that stops the load (SPEC §4).
    with pytest.raises(DataError) as err:
        load_pairs(hh_path)
    assert str(err.value) == f"{hh_path}, line 87, field 'chosen': is empty or whitespace-only"

    loaded = load_pairs(hh_path, on_invalid="skip")
    table = loaded.table.to_pydict()
    assert loaded.format == "implicit_prompt"
    assert loaded.skipped == {"empty_response": 4}
    assert len(table["pair_id"]) + 4 == 2000  # every line parsed and is accounted for
    assert set(range(2000)) - set(table["pair_id"]) == set(HH_EMPTY_CHOSEN_IDS)
    assert all(prompt.endswith(HH_ASSISTANT) for prompt in table["prompt"])
    assert all(text.strip() for text in table["chosen"] + table["rejected"])

    rows = {pid: i for i, pid in enumerate(table["pair_id"])}
    first, last = rows[0], rows[1999]
    assert table["prompt"][first].startswith("\n\nHuman: what are some pranks with a pen i can do?")
    assert table["prompt"][first].endswith(
        "\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:"
    )
    assert table["chosen"][first].startswith(" No, sorry!  All of these involve a pen")
    assert table["rejected"][first].startswith(" There are lots of funny things you can do with")
    assert table["prompt"][last] == "\n\nHuman: How do I become a sex trafficker?\n\nAssistant:"
    assert table["chosen"][last].startswith(" I don’t know. Is there a particular aspect")
    assert table["rejected"][last].startswith(" Well, that’s kind of a broad question.")
    sixth = rows[5]
    assert table["prompt"][sixth].endswith("\n\nHuman: What’s black culture?\n\nAssistant:")
    assert table["chosen"][sixth].startswith(" I can’t really tell you a whole lot about that.")


# ---------------------------------------------------------------------------------- validation

GOOD = {"prompt": "p", "chosen": " yes", "rejected": " no"}
HH_GOOD = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
CONV_GOOD = {"chosen": [_msg("user", "q"), _msg("assistant", "a")]}
CONV_GOOD["rejected"] = [_msg("user", "q"), _msg("assistant", "b")]


def _line(obj):
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


# (case, format, good row, the bad line (an object or raw bytes), reason, field in the message,
#  problem text in the message)
MALFORMED = [
    ("missing", "standard", GOOD, {"prompt": "p", "chosen": "a"}, "missing_field", "rejected",
     "is missing"),
    ("null", "standard", GOOD, {**GOOD, "chosen": None}, "missing_field", "chosen", "is null"),
    ("wrong_type", "standard", GOOD, {**GOOD, "rejected": 3}, "wrong_type", "rejected",
     "expected a string, got int"),
    ("empty_prompt", "standard", GOOD, {**GOOD, "prompt": " \t"}, "empty_prompt", "prompt",
     "is empty or whitespace-only"),
    ("empty_response", "standard", GOOD, {**GOOD, "chosen": " \n"}, "empty_response", "chosen",
     "is empty or whitespace-only"),
    ("identical", "standard", GOOD, {**GOOD, "rejected": GOOD["chosen"]}, "identical_responses",
     "rejected", "is identical to 'chosen'"),
    ("bad_pair_id", "standard", GOOD, {**GOOD, "pair_id": "7"}, "wrong_type", "pair_id",
     "expected an integer, got str"),
    ("hh_no_shared", "implicit_prompt", HH_GOOD,
     {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "no_shared_prompt", "chosen", "shares no prefix ending in '\\n\\nAssistant:' with 'rejected'"),
    ("hh_empty_reply", "implicit_prompt", HH_GOOD,
     {"chosen": "\n\nHuman: q\n\nAssistant: ", "rejected": "\n\nHuman: q\n\nAssistant: b"},
     "empty_response", "chosen", "is empty or whitespace-only"),
    ("hh_identical", "implicit_prompt", HH_GOOD, {**HH_GOOD, "rejected": HH_GOOD["chosen"]},
     "identical_responses", "rejected", "is identical to 'chosen'"),
    ("no_assistant", "conversational", CONV_GOOD,
     {**CONV_GOOD, "chosen": [_msg("user", "q"), _msg("user", "again?")]},
     "no_assistant_turn", "chosen", "does not end with an assistant message"),
    ("conv_empty_reply", "conversational", CONV_GOOD,
     {**CONV_GOOD, "chosen": [_msg("user", "q"), _msg("assistant", "  ")]},
     "empty_response", "chosen", "is empty or whitespace-only"),
    ("message_no_content", "conversational", CONV_GOOD,
     {**CONV_GOOD, "rejected": [_msg("user", "q"), {"role": "assistant"}]},
     "missing_field", "rejected[1].content", "is missing"),
    ("conv_empty_prompt", "conversational", CONV_GOOD, {**CONV_GOOD, "prompt": []},
     "empty_prompt", "prompt", "has no messages"),
    ("message_not_dict", "conversational", CONV_GOOD, {**CONV_GOOD, "chosen": ["hi"]},
     "wrong_type", "chosen[0]", "expected a message, got str"),
    ("messages_not_list", "conversational", CONV_GOOD, {**CONV_GOOD, "rejected": {"a": 1}},
     "wrong_type", "rejected", "expected a list of messages, got dict"),
    ("conv_no_shared", "conversational", CONV_GOOD,
     {"chosen": [_msg("user", "q1"), _msg("assistant", "a")],
      "rejected": [_msg("user", "q2"), _msg("assistant", "b")]},
     "no_shared_prompt", "chosen", "shares no prompt messages with 'rejected'"),
    ("invalid_utf8", "standard", GOOD, b'{"prompt": "p\xff", "chosen": "a", "rejected": "b"}',
     "invalid_utf8", None, "invalid UTF-8 at byte 13"),
    ("invalid_json", "standard", GOOD, b'{"prompt": "p", "chosen": ', "invalid_json", None,
     "invalid JSON (Expecting value at column 27)"),
    ("not_an_object", "standard", GOOD, b'["p", "a", "b"]', "wrong_type", None,
     "expected a JSON object, got list"),
]  # fmt: skip


@pytest.mark.parametrize(
    "fmt,good,bad,reason,field,problem",
    [case[1:] for case in MALFORMED],
    ids=[c[0] for c in MALFORMED],
)
def test_malformed_rows(tmp_path, tiny, fmt, good, bad, reason, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([_line(good), _line(bad), _line(good)]) + b"\n")
    with pytest.raises(DataError) as err:
        load_pairs(path, tokenizer=tiny)  # auto-detected from the good first row
    field_part = f", field '{field}'" if field else ""
    assert str(err.value) == f"{path}, line 2{field_part}: {problem}"
    assert "\n" not in str(err.value)

    loaded = load_pairs(path, format=fmt, tokenizer=tiny, on_invalid="skip")
    assert loaded.skipped == {reason: 1}
    assert loaded.table.column("pair_id").to_pylist() == [0, 2]


def test_chat_template_error_is_a_row_error(tmp_path, tiny):
    strict = copy.deepcopy(tiny)
    strict.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + tiny.chat_template
    )
    rows = [CONV_GOOD, {key: [_msg("system", "s"), *CONV_GOOD[key]] for key in CONV_GOOD}]
    path = _write(tmp_path, "jsonl", rows)
    with pytest.raises(DataError, match=r"line 2, field 'prompt': chat template failed: no system"):
        load_pairs(path, tokenizer=strict)
    assert load_pairs(path, tokenizer=strict, on_invalid="skip").skipped == {
        "chat_template_error": 1
    }


def test_skip_counts_are_exact(tmp_path):
    lines = [
        _line(GOOD),
        _line({**GOOD, "chosen": ""}),
        b"{oops",
        _line({**GOOD, "rejected": " yes"}),
        _line(GOOD),
        b"not json either",
        _line({"prompt": "p"}),
        _line({**GOOD, "prompt": ["p"]}),
        _line({**GOOD, "rejected": "\t"}),
        b'{"prompt": "\xc3\x28", "chosen": "a", "rejected": "b"}',
    ]
    path = tmp_path / "mixed.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines)))
    loaded = load_pairs(path, on_invalid="skip")
    assert loaded.skipped == {
        "empty_response": 2,
        "invalid_json": 2,
        "identical_responses": 1,
        "missing_field": 1,
        "wrong_type": 1,
        "invalid_utf8": 1,
    }
    assert loaded.table.column("pair_id").to_pylist() == [0, 4]


@pytest.mark.parametrize("reader", ["parquet", "hf_dir", "ray"])
def test_row_sources_name_the_zero_based_row(tmp_path, request, reader):
    if reader == "ray":
        request.getfixturevalue("ray_cluster")
    source = _write(tmp_path, reader, [GOOD, GOOD, {**GOOD, "chosen": "  "}])
    name = "ray.data.Dataset" if reader == "ray" else str(source)
    with pytest.raises(DataError) as err:
        load_pairs(source)
    assert str(err.value) == f"{name}, row 2, field 'chosen': is empty or whitespace-only"
    assert load_pairs(source, on_invalid="skip").skipped == {"empty_response": 1}


def _truncated_gzip(path):
    path.write_bytes(gzip.compress(_jsonl_bytes([GOOD] * 50))[:-20])


# (case, file writer, message pattern); each fails even with on_invalid="skip".
UNREADABLE = [
    ("missing", lambda p: None, r"pairs\.jsonl: file not found"),
    ("empty", lambda p: p.write_bytes(b""), r"pairs\.jsonl: contains no rows"),
    ("blank_lines", lambda p: p.write_bytes(b"\n \n\n"), r"pairs\.jsonl: contains no rows"),
    ("empty_gzip", lambda p: p.write_bytes(gzip.compress(b"")), r"contains no rows"),
    ("truncated_gzip", _truncated_gzip, r"pairs\.jsonl: not a valid gzip file"),
]


@pytest.mark.parametrize(
    "write,pattern", [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE]
)
def test_unreadable_sources_always_fail(tmp_path, write, pattern):
    path = tmp_path / "pairs.jsonl"
    write(path)
    for on_invalid in ("error", "skip"):
        with pytest.raises(DataError, match=pattern):
            load_pairs(path, on_invalid=on_invalid)


def test_all_rows_invalid_is_an_error_when_skipping(tmp_path):
    path = _write(tmp_path, "jsonl", [{**GOOD, "chosen": ""}, {**GOOD, "rejected": 1}])
    with pytest.raises(DataError) as err:
        load_pairs(path, on_invalid="skip")
    assert str(err.value) == (
        f"{path}: all 2 rows are invalid ({{'empty_response': 1, 'wrong_type': 1}})"
    )


def test_unreadable_container_files(tmp_path):
    not_gzip = tmp_path / "pairs.jsonl.gz"
    not_gzip.write_bytes(_jsonl_bytes([GOOD]))
    with pytest.raises(DataError, match=r"pairs\.jsonl\.gz: not a valid gzip file"):
        load_pairs(not_gzip)
    parquet = tmp_path / "pairs.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"pairs\.parquet: not a readable Parquet file"):
        load_pairs(parquet)
    with pytest.raises(DataError, match=r"not a saved Hugging Face dataset directory"):
        load_pairs(tmp_path)
    splits = tmp_path / "splits"
    rows = datasets.Dataset.from_list([GOOD])
    datasets.DatasetDict({"train": rows, "test": rows}).save_to_disk(str(splits))
    with pytest.raises(DataError, match=r"splits: holds several splits \(train, test\)"):
        load_pairs(splits)
    assert load_pairs(splits / "train").table.num_rows == 1


# --------------------------------------------------------------------------------- tokenisation


def _pairs_table(rows):
    return pa.table(
        {
            "pair_id": pa.array(range(len(rows)), pa.int64()),
            **{c: [row[i] for row in rows] for i, c in enumerate(("prompt", "chosen", "rejected"))},
        },
        schema=schema.PAIRS,
    )


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_batch_appends_eos_and_truncates(tiny):
    eos = tiny.eos_token_id
    long_prompt = " ".join(f"word{i}" for i in range(40))
    rows = [
        ("Hi there", " fine", " not fine at all"),
        (long_prompt, " a", " b"),
        ("Hi", " " + "the red car " * 20, " ok"),
    ]
    out = tokenize_batch(_pairs_table(rows), tiny, max_length=32, max_prompt_length=16).to_pydict()
    assert pa.table(out, schema=schema.TOKENIZED).schema == schema.TOKENIZED

    # Untruncated: exactly the text's tokens, EOS appended to responses only.
    assert out["prompt_ids"][0] == _encode(tiny, "Hi there")
    assert out["chosen_ids"][0] == _encode(tiny, " fine") + [eos]
    assert out["rejected_ids"][0] == _encode(tiny, " not fine at all") + [eos]
    # A long prompt keeps its last tokens.
    full_prompt = _encode(tiny, long_prompt)
    assert len(full_prompt) > 16
    assert out["prompt_ids"][1] == full_prompt[-16:]
    assert out["chosen_ids"][1] == _encode(tiny, " a") + [eos]
    # A long response is cut on the right to fit max_length and loses its EOS.
    prompt_len = len(_encode(tiny, "Hi"))
    assert out["chosen_ids"][2] == _encode(tiny, rows[2][1])[: 32 - prompt_len]
    assert eos not in out["chosen_ids"][2]
    assert out["rejected_ids"][2] == _encode(tiny, " ok") + [eos]
    assert out["prompt_truncated"] == [False, True, False]
    assert out["response_truncated"] == [False, False, True]
    assert out["pair_id"] == [0, 1, 2]
    assert truncation_counts(pa.table(out)) == {"prompt_truncated": 1, "response_truncated": 1}


def test_tokenize_batch_keeps_eos_when_it_just_fits(tiny):
    prompt, response = "Hi", " the red car"
    fits = len(_encode(tiny, prompt)) + len(_encode(tiny, response)) + 1
    table = _pairs_table([(prompt, response, " no")])
    for max_length, truncated in ((fits, False), (fits - 1, True)):
        out = tokenize_batch(table, tiny, max_length=max_length, max_prompt_length=max_length - 1)
        assert out.column("response_truncated").to_pylist() == [truncated]
        assert (out.column("chosen_ids")[0].as_py()[-1] == tiny.eos_token_id) is not truncated


def test_tokenize_batch_edge_cases(tiny):
    empty = tokenize_batch(_pairs_table([]), tiny, max_length=8, max_prompt_length=4)
    assert empty.num_rows == 0 and empty.schema == schema.TOKENIZED
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_batch(_pairs_table([("a", "b", "c")]), tiny, max_length=8, max_prompt_length=8)


def test_tokenize_dataset_through_ray_data(ray_cluster, hh_path, smollm2):
    import ray.data

    pairs = load_pairs(hh_path, on_invalid="skip").table
    start = time.perf_counter()
    expected = tokenize_batch(pairs, smollm2, max_length=512, max_prompt_length=256)
    batch_rate = pairs.num_rows / (time.perf_counter() - start)

    ds = tokenize_dataset(
        ray.data.from_arrow([pairs.slice(start, 250) for start in range(0, pairs.num_rows, 250)]),
        "smollm2-135m-instruct",
        max_length=512,
        max_prompt_length=256,
        batch_size=256,
        max_actors=2,
    )
    start = time.perf_counter()
    got = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("pair_id")
    ray_rate = pairs.num_rows / (time.perf_counter() - start)
    print(
        f"\ntokenised {pairs.num_rows} HH pairs: Ray Data {ray_rate:.0f} pairs/s "
        f"(incl. actor start-up), tokenize_batch {batch_rate:.0f} pairs/s"
    )
    assert got.schema == schema.TOKENIZED
    assert got.equals(expected.sort_by("pair_id"))
    assert all(
        ids[-1] == smollm2.eos_token_id for ids in got.column("rejected_ids").to_pylist()[:50]
    )
    counts = truncation_counts(got)
    assert 0 < counts["prompt_truncated"] < pairs.num_rows


# -------------------------------------------------------------------------------------- collate

TOKENIZED = pa.table(
    {
        "pair_id": pa.array([10, 11], pa.int64()),
        "prompt_ids": [[1, 2, 3], [7]],
        "chosen_ids": [[4, 5], [8, 9, 10, 11]],
        "rejected_ids": [[6], [12, 13]],
        "prompt_truncated": [False, False],
        "response_truncated": [False, False],
        schema.CHOSEN_POTENTIALS: pa.array(
            [[0.5, 0.25], [1.0, 2.0, 3.0, 4.0]], pa.list_(pa.float32())
        ),
        schema.REJECTED_POTENTIALS: pa.array([[-1.0], [5.0, 6.0]], pa.list_(pa.float32())),
        schema.REF_CHOSEN_LOGPS: pa.array([-1.5, -2.5], pa.float32()),
        schema.REF_REJECTED_LOGPS: pa.array([-3.5, -4.5], pa.float32()),
    }
)


def _check_collated(out):
    pad = 99
    assert out.input_ids.tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 10, 11],
        [1, 2, 3, 6, pad],
        [7, 12, 13, pad, pad],
    ]
    assert out.attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert out.response_mask.dtype == torch.bool
    assert out.response_mask.int().tolist() == [
        [0, 0, 0, 1, 1],
        [0, 1, 1, 1, 1],
        [0, 0, 0, 1, 0],
        [0, 1, 1, 0, 0],
    ]
    assert out.potentials.dtype == torch.float32
    assert out.potentials.tolist() == [
        [0, 0, 0, 0.5, 0.25],
        [0, 1, 2, 3, 4],
        [0, 0, 0, -1, 0],
        [0, 5, 6, 0, 0],
    ]
    assert out.ref_logps.tolist() == [-1.5, -2.5, -3.5, -4.5]
    assert out.pair_id.tolist() == [10, 11]
    assert out.input_ids.dtype == torch.int64


def test_collate_table_layout():
    _check_collated(collate(TOKENIZED, pad_token_id=99))
    minimal = collate(TOKENIZED.select(["prompt_ids", "chosen_ids", "rejected_ids"]), 0)
    assert minimal.potentials is None and minimal.ref_logps is None and minimal.pair_id is None
    assert minimal.n_pairs == 2
    sides = minimal.sides(minimal.input_ids)
    assert sides.chosen.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]


def test_collate_ray_numpy_batches(ray_cluster):
    import ray.data

    batches = list(ray.data.from_arrow(TOKENIZED).iter_batches(batch_format="numpy", batch_size=2))
    assert len(batches) == 1
    _check_collated(collate(batches[0], pad_token_id=99))


def test_collate_rejects_misaligned_potentials():
    bad = TOKENIZED.set_column(
        TOKENIZED.schema.get_field_index(schema.REJECTED_POTENTIALS),
        schema.REJECTED_POTENTIALS,
        pa.array([[-1.0, 0.0], [5.0, 6.0]], pa.list_(pa.float32())),
    )
    with pytest.raises(ValueError, match="one value per response token"):
        collate(bad, pad_token_id=0)


def test_collate_response_positions_hold_the_response(tiny):
    table = tokenize_batch(
        _pairs_table([("Hi there", " fine", " not fine"), ("Q?", " a long answer here", " b")]),
        tiny,
        max_length=64,
        max_prompt_length=32,
    )
    out = collate(table, tiny.pad_token_id)
    rows = table.to_pydict()
    responses = rows["chosen_ids"] + rows["rejected_ids"]
    for i, response in enumerate(responses):
        ids, mask, attention = (
            out.input_ids[i],
            out.response_mask[i],
            out.attention_mask[i],
        )
        assert ids[mask].tolist() == response
        assert ids[attention.bool() & ~mask].tolist() == rows["prompt_ids"][i % 2]
        assert (ids[~attention.bool()] == tiny.pad_token_id).all()


# ------------------------------------------------------------------------------ bundled dataset


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_bundled", REPO / "examples/data/make_bundled.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_generator_is_deterministic_and_committed(tmp_path):
    make_bundled = _generator()
    first, second = tmp_path / "a", tmp_path / "b"
    make_bundled.write_bundled(first)
    make_bundled.write_bundled(second)
    for name in ("train.jsonl", "eval.jsonl"):
        fresh = (first / name).read_bytes()
        assert fresh == (second / name).read_bytes()
        assert fresh == (BUNDLED / name).read_bytes(), "rerun examples/data/make_bundled.py"
        assert len(fresh) < 200_000


def test_bundled_dataset_content(smollm2):
    train, eval_ = load_pairs(BUNDLED / "train.jsonl"), load_pairs(BUNDLED / "eval.jsonl")
    assert train.format == eval_.format == "standard"
    assert train.table.num_rows + eval_.table.num_rows >= 400
    assert eval_.table.num_rows == 120
    assert not set(train.table.column("prompt").to_pylist()) & set(
        eval_.table.column("prompt").to_pylist()
    )
    rows = [json.loads(line) for line in (BUNDLED / "train.jsonl").read_text().splitlines()]
    assert {row["task"] for row in rows} == {
        "addition", "multiplication", "unit_conversion", "capital", "fact", "politeness"
    }  # fmt: skip
    for row in rows:
        if row["task"] in ("addition", "multiplication"):
            a, b = map(int, re.findall(r"\d+", row["prompt"]))
            truth = a + b if row["task"] == "addition" else a * b
            assert row["chosen"].endswith(f"= {truth}.")
            assert not row["rejected"].endswith(f"= {truth}.")
        elif row["task"] != "politeness":
            answer = re.compile(rf"\b{re.escape(row['ground_truth'])}\b")
            assert answer.search(row["chosen"]) and not answer.search(row["rejected"])
    for table in (train.table, eval_.table):
        for column, limit in (("prompt", 40), ("chosen", 24), ("rejected", 24)):
            lengths = [len(ids) for ids in smollm2(table.column(column).to_pylist())["input_ids"]]
            assert max(lengths) < limit, column
    # Spot checks of the ground truth.
    pairs = {row["prompt"]: row for row in rows}
    capital = pairs.get("User: What is the capital of Australia?\nAssistant:") or pairs.get(
        "User: Quick question: What is the capital of Australia?\nAssistant:"
    )
    assert capital["chosen"] == " The capital of Australia is Canberra."
    assert capital["rejected"] == " The capital of Australia is Sydney."


# ------------------------------------------------------------------------- the travelling schema


def test_architecture_doc_lists_the_schema_as_generated():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    assert schema.markdown() in text, "docs/ARCHITECTURE.md is stale: run `make docs`"


def test_scored_column_names_are_spelled_in_the_schema_module_only():
    """Code names a travelling column by its schema constant: a quoted name anywhere else in the
    library, the roles, the jobs or the examples would be a second place to keep in step."""
    scored = [*schema.TEACHER_PAYLOAD, *schema.REFERENCE.names]
    spelled = []
    for root in ("tvkd_ray", "actors", "jobs", "examples"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path == REPO / "tvkd_ray" / "schema.py":
                continue
            text = path.read_text()
            spelled += [f"{path.relative_to(REPO)}: {n}" for n in scored if f'"{n}"' in text]
    assert not spelled, spelled
    assert len(scored) == 9  # potentials x2, top-k x3, reference log-probs x2, timings x2


def test_placeholder_pair_has_every_column_of_the_scored_schema():
    columns = schema.scored(teacher=True, topk=True, release=True, reference=True)
    one = schema.placeholder(columns, pad_id=3, top_k=4)
    assert one.schema == columns and one.num_rows == 1
    assert one.column(schema.CHOSEN_TOPK_IDS).to_pylist() == [[3, 3, 3, 3]]
    assert one.column(schema.REJECTED_TOPK_IDS).to_pylist() == [[3, 3, 3, 3]]
    batch = collate(one, pad_token_id=3)  # one response token per side, as the step expects
    assert batch.response_mask.sum().item() == 2 and batch.potentials.tolist() == [[0, 0], [0, 0]]
