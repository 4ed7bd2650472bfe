"""Teacher and student with different tokenizers (SPEC §2.3c): states as character positions.

A state is the text before a response token, so it can be named by a character position in the
response text. The tokeniser stage writes, for each student response token, the position of its
state, and the text the student's tokens cover after truncation (``schema.ALIGNMENT``). The
teacher tokenises exactly that text with its own tokenizer, scores its own states, and gives each
student state the potential of the teacher state with the longest text prefix not extending past
it (``align``). Only the potentials aligned to the student's tokens leave the teacher.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from tvkd_ray import schema

# Per side: the text column the teacher tokenises and the student's state positions in it.
RESPONSE_COLUMNS = (
    (schema.CHOSEN_TEXT, schema.CHOSEN_STATE_CHARS),
    (schema.REJECTED_TEXT, schema.REJECTED_STATE_CHARS),
)


def state_chars(offsets: list[tuple[int, int]], text_length: int, eos: bool) -> np.ndarray:
    """The character position of the state before each token of one response (and before its
    EOS, at the end of the text, when ``eos``): the end of the previous token, or the start of
    this one where the two share a character (a character cut into byte pieces: a state inside it
    has only the text before it)."""
    starts = np.array([start for start, _ in offsets], dtype=np.int64)
    previous_ends = np.array([0, *(end for _, end in offsets[:-1])], dtype=np.int64)
    chars = np.minimum(previous_ends, starts)
    if eos:
        chars = np.append(chars, text_length)
    # Offsets of some tokenizers step back (overlapping pieces); a state never comes before one
    # the text already passed.
    return np.maximum.accumulate(chars).astype(np.int32)


def align(teacher_chars: np.ndarray, student_chars: np.ndarray) -> np.ndarray:
    """The index of the teacher state each student state takes: the last teacher state at or
    before its position. Where both sides have several states at one position (a character cut
    into pieces, a zero-width token), they pair up in order, so identical tokenizations map each
    state to itself."""
    last = np.searchsorted(teacher_chars, student_chars, side="right") - 1
    first = np.searchsorted(teacher_chars, student_chars, side="left")
    ordinal = np.arange(len(student_chars)) - np.searchsorted(
        student_chars, student_chars, side="left"
    )
    return np.where(first <= last, np.minimum(first + ordinal, last), last)


def map_potentials(
    teacher_phi: pa.ListArray, teacher_chars: pa.ListArray, student_chars: pa.ListArray
) -> pa.ListArray:
    """Per row, the teacher's potentials taken at the student's states (one per student token)."""
    rows = zip(teacher_phi.to_pylist(), teacher_chars.to_pylist(), student_chars.to_pylist())
    mapped = [
        np.asarray(phi, dtype=np.float32)[align(np.asarray(t), np.asarray(s))].tolist()
        for phi, t, s in rows
    ]
    return pa.array(mapped, type=pa.list_(pa.float32()))


def student_columns(
    table: pa.Table, encodings: dict[str, Any], kept: dict[str, list[int]]
) -> dict[str, list]:
    """The alignment columns of tokenised pairs: the text the kept student tokens cover, and the
    state position of each kept response token.

    ``encodings`` holds the tokenizer's output (with offsets) of each text column, ``kept`` the
    number of tokens kept per row: a left-truncated prompt keeps its last tokens, a response its
    first ones, plus EOS when the budget left room for it."""
    prompts = table.column(schema.PROMPT).to_pylist()
    columns: dict[str, list] = {schema.PROMPT_TEXT: []}
    for text, offsets, n in zip(
        prompts, encodings[schema.PROMPT]["offset_mapping"], kept[schema.PROMPT]
    ):
        dropped = len(offsets) - n
        columns[schema.PROMPT_TEXT].append(text[offsets[dropped - 1][1] :] if dropped else text)
    for (text_column, chars_column), side in zip(
        RESPONSE_COLUMNS, (schema.CHOSEN, schema.REJECTED)
    ):
        texts, chars = [], []
        responses = table.column(side).to_pylist()
        for text, offsets, n in zip(responses, encodings[side]["offset_mapping"], kept[side]):
            tokens = offsets[:n]
            text = text[: tokens[-1][1]] if n < len(offsets) and tokens else text
            texts.append(text)
            chars.append(state_chars(tokens, len(text), eos=n > len(offsets)).tolist())
        columns[text_column], columns[chars_column] = texts, chars
    return columns


def teacher_tokens(table: pa.Table, tokenizer: Any) -> tuple[pa.Table, dict[str, pa.ListArray]]:
    """The pairs of ``table`` tokenised by the teacher's own tokenizer (``schema.TOKEN_IDS``,
    EOS after every response), and the position of each teacher state per response column.

    EOS is appended even after a truncated response: the model is causal, so that one extra token
    changes no earlier state, and its state lies past every student state of such a response."""

    def encode(column: str) -> dict:
        texts = table.column(column).to_pylist()
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)

    eos = [tokenizer.eos_token_id]
    columns = {schema.PROMPT_IDS: encode(schema.PROMPT_TEXT)["input_ids"]}
    chars = {}
    for (text_column, chars_column), ids_column in zip(
        RESPONSE_COLUMNS, (schema.CHOSEN_IDS, schema.REJECTED_IDS)
    ):
        encoded, texts = encode(text_column), table.column(text_column).to_pylist()
        columns[ids_column] = [ids + eos for ids in encoded["input_ids"]]
        chars[chars_column] = pa.array(
            [state_chars(o, len(t), eos=True) for o, t in zip(encoded["offset_mapping"], texts)],
            type=pa.list_(pa.int32()),
        )
    ids = {k: pa.array(v, pa.list_(pa.int32())) for k, v in columns.items()}
    return pa.table({schema.PAIR_ID: table.column(schema.PAIR_ID), **ids}), chars
