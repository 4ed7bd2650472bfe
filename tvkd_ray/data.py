"""Preference data: readers, format detection, validation, tokenisation and collation (SPEC §4).

``load_pairs`` reads JSONL (optionally gzipped), Parquet, a saved Hugging Face dataset directory or
a ``ray.data.Dataset`` into the normalised pairs table of docs/ARCHITECTURE.md; ``tokenize_batch``
/ ``tokenize_dataset`` turn it into the tokenised schema; ``collate`` builds one forward batch.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch

from tvkd_ray import alignment, schema
from tvkd_ray.errors import DataError
from tvkd_ray.loss import Sides
from tvkd_ray.models import load_tokenizer

FORMATS = ("auto", "standard", "conversational", "implicit_prompt")
HH_ASSISTANT = "\n\nAssistant:"

# Reason keys of invalid rows: DataError messages and the skip counts logged to MLflow use them.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
NO_ASSISTANT_TURN = "no_assistant_turn"
NO_SHARED_PROMPT = "no_shared_prompt"
CHAT_TEMPLATE_ERROR = "chat_template_error"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"

_READ_BATCH_ROWS = 1024


@dataclass
class LoadedPairs:
    """Normalised pairs (``schema.PAIRS``) and what was dropped on the way."""

    table: pa.Table
    source: str
    format: str
    skipped: dict[str, int]


class _InvalidRow(Exception):
    """One row fails validation; ``load_pairs`` turns it into a DataError or a skip count."""

    def __init__(self, reason: str, field: str | None, problem: str) -> None:
        super().__init__(problem)
        self.reason, self.field, self.problem = reason, field, problem


# --------------------------------------------------------------------------------------- readers

# A reader yields (where, index, row): "line 17" / "row 16", the 0-based index used as the default
# pair_id, and the row as a dict, or the _InvalidRow that stopped it from being decoded.
_Rows = Iterator[tuple[str, int, "dict[str, Any] | _InvalidRow"]]


def _read_jsonl(path: Path, gzipped: bool) -> _Rows:
    # Line by line with json.loads (not pyarrow.json) so each error names its line, and mixed
    # types across rows are reported per row instead of failing schema inference for the file.
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if raw.strip():  # blank lines (e.g. a trailing one) are not rows
                    yield f"line {number}", number - 1, _decode_json_line(raw)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # The rest of the file is lost, so this is never skippable.
        raise DataError(f"{path}: not a valid gzip file ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _decode_json_line(raw: bytes) -> dict[str, Any] | _InvalidRow:
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8")  # so error columns count within the line
    except UnicodeDecodeError as exc:
        return _InvalidRow(INVALID_UTF8, None, f"invalid UTF-8 at byte {exc.start}")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return _InvalidRow(INVALID_JSON, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(row, dict):
        return _InvalidRow(WRONG_TYPE, None, f"expected a JSON object, got {type(row).__name__}")
    return row


def _rows_of_tables(tables: Iterator[pa.Table]) -> _Rows:
    index = 0
    for table in tables:
        for row in table.to_pylist():
            yield f"row {index}", index, row
            index += 1


def _read_parquet(path: Path) -> _Rows:
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=_READ_BATCH_ROWS)
        yield from _rows_of_tables(pa.Table.from_batches([batch]) for batch in batches)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_hf_dir(path: Path) -> _Rows:
    import datasets  # slow to import and only needed for this source

    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a saved Hugging Face dataset directory ({exc})") from exc
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        raise DataError(f"{path}: holds several splits ({splits}); pass one split's directory")
    yield from _rows_of_tables(dataset.with_format("arrow").iter(batch_size=_READ_BATCH_ROWS))


def _read_ray(dataset: ray.data.Dataset) -> _Rows:
    # Pairs are validated on the driver; only the small text table is materialised here.
    batches = dataset.iter_batches(batch_size=_READ_BATCH_ROWS, batch_format="pyarrow")
    yield from _rows_of_tables(batches)


def _open_source(source: str | Path | ray.data.Dataset) -> tuple[str, _Rows]:
    """The source's display name and its row iterator; missing files fail here."""
    if isinstance(source, ray.data.Dataset):
        return "ray.data.Dataset", _read_ray(source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return str(path), _read_hf_dir(path)
    with open(path, "rb") as head:
        magic = head.read(4)
    if path.suffix == ".parquet" or magic == b"PAR1":
        return str(path), _read_parquet(path)
    gzipped = path.suffix == ".gz" or magic[:2] == b"\x1f\x8b"
    return str(path), _read_jsonl(path, gzipped)


# ------------------------------------------------------------------------------ field validation


def _get(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _InvalidRow(MISSING_FIELD, name, "is missing" if name not in row else "is null")
    return value


def _string(row: dict[str, Any], name: str) -> str:
    value = _get(row, name)
    if not isinstance(value, str):
        raise _InvalidRow(WRONG_TYPE, name, f"expected a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    value = _get(row, name)
    if not isinstance(value, list):
        raise _InvalidRow(
            WRONG_TYPE, name, f"expected a list of messages, got {type(value).__name__}"
        )
    for position, message in enumerate(value):
        where = f"{name}[{position}]"
        if not isinstance(message, dict):
            raise _InvalidRow(
                WRONG_TYPE, where, f"expected a message, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            try:
                _string(message, key)
            except _InvalidRow as invalid:
                raise _InvalidRow(invalid.reason, f"{where}.{key}", invalid.problem) from None
    return value


def _require_text(text: str, name: str, reason: str) -> None:
    if not text.strip():
        raise _InvalidRow(reason, name, "is empty or whitespace-only")


def _shared_prefix_length(a: str | list, b: str | list) -> int:
    """Number of leading characters (or messages) that ``a`` and ``b`` have in common."""
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    return shared


def _pair_id(row: dict[str, Any], index: int) -> int:
    """A pair_id the source brings (e.g. a Ray Dataset column) is kept, else the row index."""
    value = row.get(schema.PAIR_ID)
    if value is None:
        return index
    if isinstance(value, bool) or not isinstance(value, int):
        raise _InvalidRow(
            WRONG_TYPE, schema.PAIR_ID, f"expected an integer, got {type(value).__name__}"
        )
    return value


# --------------------------------------------------------------------------------------- formats


def _standard(row: dict[str, Any], tokenizer: Any) -> tuple[str, str, str]:
    prompt, chosen, rejected = (_string(row, name) for name in ("prompt", "chosen", "rejected"))
    _require_text(prompt, "prompt", EMPTY_PROMPT)
    _require_text(chosen, "chosen", EMPTY_RESPONSE)
    _require_text(rejected, "rejected", EMPTY_RESPONSE)
    if chosen == rejected:
        raise _InvalidRow(IDENTICAL_RESPONSES, "rejected", "is identical to 'chosen'")
    return prompt, chosen, rejected


def _implicit_prompt(row: dict[str, Any], tokenizer: Any) -> tuple[str, str, str]:
    """HH-RLHF dialogues: the prompt ends at the last shared "\\n\\nAssistant:" (as TRL's
    extract_prompt); responses keep their leading space, e.g. " Sure, ..."."""
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    if chosen == rejected:
        raise _InvalidRow(IDENTICAL_RESPONSES, "rejected", "is identical to 'chosen'")
    end = chosen.rfind(HH_ASSISTANT, 0, _shared_prefix_length(chosen, rejected))
    if end < 0:
        problem = f"shares no prefix ending in {HH_ASSISTANT!r} with 'rejected'"
        raise _InvalidRow(NO_SHARED_PROMPT, "chosen", problem)
    end += len(HH_ASSISTANT)
    prompt, chosen, rejected = chosen[:end], chosen[end:], rejected[end:]
    _require_text(chosen, "chosen", EMPTY_RESPONSE)
    _require_text(rejected, "rejected", EMPTY_RESPONSE)
    return prompt, chosen, rejected


def _conversational(row: dict[str, Any], tokenizer: Any) -> tuple[str, str, str]:
    """TRL conversational rows: an explicit ``prompt`` message list, or the messages chosen and
    rejected share; each response must end with an assistant message."""
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    if chosen == rejected:
        raise _InvalidRow(IDENTICAL_RESPONSES, "rejected", "is identical to 'chosen'")
    if row.get("prompt") is not None:
        prompt = _messages(row, "prompt")
        if not prompt:
            raise _InvalidRow(EMPTY_PROMPT, "prompt", "has no messages")
    else:
        shared = _shared_prefix_length(chosen, rejected)
        if shared == 0:
            raise _InvalidRow(
                NO_SHARED_PROMPT, "chosen", "shares no prompt messages with 'rejected'"
            )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response or response[-1]["role"] != "assistant":
            raise _InvalidRow(NO_ASSISTANT_TURN, name, "does not end with an assistant message")
        _require_text("".join(m["content"] for m in response), name, EMPTY_RESPONSE)
    prompt_text = _render(tokenizer, prompt, "prompt", add_generation_prompt=True)
    return (
        prompt_text,
        _render_response(tokenizer, prompt, chosen, prompt_text, "chosen"),
        _render_response(tokenizer, prompt, rejected, prompt_text, "rejected"),
    )


def _render(tokenizer: Any, messages: list, name: str, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except jinja2.TemplateError as exc:  # templates raise on e.g. non-alternating roles
        raise _InvalidRow(CHAT_TEMPLATE_ERROR, name, f"chat template failed: {exc}") from exc


def _render_response(
    tokenizer: Any, prompt: list, response: list, prompt_text: str, name: str
) -> str:
    """The text the chat template adds for the response messages, without a final EOS (the
    tokeniser appends EOS to every response)."""
    full = _render(tokenizer, prompt + response, name, add_generation_prompt=False)
    if not full.startswith(prompt_text):
        # Some templates render earlier turns differently once a reply follows (e.g. dropping
        # reasoning); the rendered prefix is then not the prompt, so use the raw final content.
        return response[-1]["content"]
    text = full[len(prompt_text) :]
    eos = tokenizer.eos_token
    # ChatML ends a reply with "<|im_end|>\n"; when that end marker is the EOS token, drop it so
    # the response does not end in the marker twice once EOS is appended.
    if eos and text.rstrip().endswith(eos):
        text = text.rstrip()[: -len(eos)]
    return text


_NORMALISERS = {
    "standard": _standard,
    "implicit_prompt": _implicit_prompt,
    "conversational": _conversational,
}


def _detect_format(rows: _Rows) -> tuple[str, _Rows]:
    """The format of the first row that shows one (``chosen`` a string or a list), and the rows
    again; without such a row "standard" is used so each row gets its own error."""
    seen = []
    for item in rows:
        seen.append(item)
        row = item[2]
        if isinstance(row, dict) and isinstance(row.get("chosen"), (str, list)):
            if isinstance(row["chosen"], list):
                detected = "conversational"
            else:
                detected = "standard" if isinstance(row.get("prompt"), str) else "implicit_prompt"
            return detected, chain(seen, rows)
    return "standard", iter(seen)


# ------------------------------------------------------------------------------------ load_pairs


def load_pairs(
    source: str | Path | ray.data.Dataset,
    *,
    format: str = "auto",
    tokenizer: Any = None,
    on_invalid: str = "error",
) -> LoadedPairs:
    """Read and validate preference pairs into ``schema.PAIRS`` (SPEC §4).

    ``source`` is a JSONL file (gzip detected by suffix or magic bytes), a Parquet file, a saved
    Hugging Face dataset directory or a ``ray.data.Dataset``. ``format`` is one of ``FORMATS``;
    conversational rows need ``tokenizer`` for its chat template. Extra fields are ignored; a
    ``pair_id`` field is kept, else the 0-based row index is the pair_id. With
    ``on_invalid="error"`` the first invalid row raises a one-line DataError naming source, row
    (JSONL: 1-based line; other sources: 0-based row) and field; with ``"skip"`` invalid rows are
    dropped and counted by reason key in ``skipped``. Missing, unreadable or empty sources and a
    source whose rows are all invalid always raise DataError.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
    name, rows = _open_source(source)
    if format == "auto":
        format, rows = _detect_format(rows)
    if format == "conversational" and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{name}: conversational rows are rendered with a chat template; "
            "pass a tokenizer that has one"
        )
    normalise = _NORMALISERS[format]
    columns: dict[str, list] = {column: [] for column in schema.PAIRS.names}
    skipped: Counter[str] = Counter()
    for where, index, row in rows:
        try:
            if isinstance(row, _InvalidRow):
                raise row
            pair = (_pair_id(row, index), *normalise(row, tokenizer))
        except _InvalidRow as invalid:
            if on_invalid == "error":
                field_part = f", field '{invalid.field}'" if invalid.field else ""
                raise DataError(f"{name}, {where}{field_part}: {invalid.problem}") from None
            skipped[invalid.reason] += 1
            continue
        for column, value in zip(schema.PAIRS.names, pair):
            columns[column].append(value)
    kept = len(columns[schema.PAIR_ID])
    if kept == 0 and not skipped:
        raise DataError(f"{name}: contains no rows")
    if kept == 0:
        raise DataError(f"{name}: all {sum(skipped.values())} rows are invalid ({dict(skipped)})")
    table = pa.table(columns, schema=schema.PAIRS)
    return LoadedPairs(table=table, source=name, format=format, skipped=dict(skipped))


# ---------------------------------------------------------------------------------- tokenisation


def _truncate_right(ids: list[int], budget: int) -> tuple[list[int], bool]:
    return (ids, False) if len(ids) <= budget else (ids[:budget], True)


def tokenize_batch(
    table: pa.Table, tokenizer: Any, *, max_length: int, max_prompt_length: int, align: bool = False
) -> pa.Table:
    """Tokenise normalised pairs into ``schema.TOKENIZED`` (plus ``schema.ALIGNMENT`` when
    ``align``: for a teacher with its own tokenizer, SPEC §2.3c).

    Each text column is encoded in one batched call without special tokens; EOS is appended to
    responses. Prompts longer than ``max_prompt_length`` keep their last tokens; responses are cut
    on the right to ``max_length - len(prompt)`` tokens, so a cut response loses its EOS (it did
    not end there). ``prompt_truncated`` / ``response_truncated`` flag the rows that were cut.
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    out_schema = pa.schema([*schema.TOKENIZED, *(schema.ALIGNMENT if align else [])])
    if table.num_rows == 0:
        return out_schema.empty_table()
    encodings = {
        name: tokenizer(
            table.column(name).to_pylist(), add_special_tokens=False, return_offsets_mapping=align
        )
        for name in schema.TEXTS
    }
    eos = [tokenizer.eos_token_id]
    columns: dict[str, list] = {name: [] for name in schema.TOKENIZED.names}
    columns[schema.PAIR_ID] = table.column(schema.PAIR_ID)
    texts = (encodings[name]["input_ids"] for name in schema.TEXTS)
    for prompt, chosen, rejected in zip(*texts):
        prompt_cut = len(prompt) > max_prompt_length
        prompt = prompt[-max_prompt_length:] if prompt_cut else prompt
        budget = max_length - len(prompt)
        chosen, chosen_cut = _truncate_right(chosen + eos, budget)
        rejected, rejected_cut = _truncate_right(rejected + eos, budget)
        columns[schema.PROMPT_IDS].append(prompt)
        columns[schema.CHOSEN_IDS].append(chosen)
        columns[schema.REJECTED_IDS].append(rejected)
        columns[schema.PROMPT_TRUNCATED].append(prompt_cut)
        columns[schema.RESPONSE_TRUNCATED].append(chosen_cut or rejected_cut)
    if align:
        kept = {t: [len(ids) for ids in columns[c]] for t, c in zip(schema.TEXTS, schema.TOKEN_IDS)}
        columns.update(alignment.student_columns(table, encodings, kept))
    return pa.table(columns, schema=out_schema)


class _TokenizeBatches:
    """Ray Data callable class: loads the tokenizer once per actor, then tokenises batches."""

    def __init__(self, tokenizer_path: str, **options) -> None:
        self._tokenizer = load_tokenizer(tokenizer_path)
        self._options = options  # tokenize_batch's keywords

    def __call__(self, batch: pa.Table) -> pa.Table:
        return tokenize_batch(batch, self._tokenizer, **self._options)


def tokenize_dataset(
    ds: ray.data.Dataset,
    tokenizer_path: str,
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int = 512,
    num_cpus: float = 1.0,
    max_actors: int | None = None,
    align: bool = False,
) -> ray.data.Dataset:
    """Tokenise a Ray Dataset of normalised pairs with an autoscaling actor pool.

    ``tokenizer_path`` is anything ``tvkd_ray.models.load_tokenizer`` accepts (a preset or a
    directory). Each actor reserves ``num_cpus`` (fractional values share cores with other
    stages); the pool grows with the cluster up to ``max_actors`` (unbounded when None).
    ``align`` adds the columns a teacher with its own tokenizer reads (``tokenize_batch``).
    """
    return ds.map_batches(
        _TokenizeBatches,
        fn_constructor_kwargs={
            "tokenizer_path": tokenizer_path,
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "align": align,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors),
        num_cpus=num_cpus,
        udf_modifying_row_count=False,
    )


def truncation_counts(table: pa.Table) -> dict[str, int]:
    """Rows whose prompt / response was truncated (logged to MLflow)."""
    return {
        name: int(table.column(name).to_numpy(zero_copy_only=False).sum())
        for name in (schema.PROMPT_TRUNCATED, schema.RESPONSE_TRUNCATED)
    }


# --------------------------------------------------------------------------------------- collate


@dataclass
class PairBatch:
    """One forward batch of B pairs as 2B rows: chosen rows, then rejected rows, each prompt then
    response, right-padded (docs/ARCHITECTURE.md "Collated batch")."""

    input_ids: torch.Tensor  # [2B, L] int64
    attention_mask: torch.Tensor  # [2B, L] int64
    response_mask: torch.Tensor  # [2B, L] bool: positions holding a response token
    potentials: torch.Tensor | None = None  # [2B, L] float32 at response positions
    ref_logps: torch.Tensor | None = None  # [2B] float32
    pair_id: torch.Tensor | None = None  # [B] int64

    @property
    def n_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def sides(self, rows: torch.Tensor) -> Sides:
        """A 2B-row tensor of this batch split into its chosen and rejected halves."""
        return Sides.split(rows, self.n_pairs)

    def to(self, device) -> PairBatch:
        moved = {k: v if v is None else v.to(device) for k, v in vars(self).items()}
        return PairBatch(**moved)


def _ids(rows: Any) -> list[np.ndarray]:
    return [np.asarray(row, dtype=np.int64) for row in rows]


def collate(batch: pa.Table | dict[str, Any], pad_token_id: int) -> PairBatch:
    """Build the 2B-row :class:`PairBatch` of B tokenised pairs.

    ``batch`` is a pyarrow Table or a dict of columns (e.g. Ray Data's
    ``iter_batches(batch_format="numpy")``). ``potentials`` (when the batch has teacher columns)
    sits at the positions where ``response_mask`` is true; ``ref_logps`` and ``pair_id`` are set
    when present.
    """
    if isinstance(batch, pa.Table):
        batch = {
            name: batch.column(name).to_numpy(zero_copy_only=False) for name in batch.column_names
        }
    prompts = _ids(batch[schema.PROMPT_IDS]) * 2
    responses = _ids(batch[schema.CHOSEN_IDS]) + _ids(batch[schema.REJECTED_IDS])
    prompt_lengths = np.array([len(ids) for ids in prompts])
    response_lengths = np.array([len(ids) for ids in responses])
    lengths = prompt_lengths + response_lengths
    positions = np.arange(lengths.max())[None, :]
    attention = positions < lengths[:, None]
    response_mask = attention & (positions >= prompt_lengths[:, None])
    # Row-major boolean assignment fills each row's valid positions with its tokens in order.
    input_ids = np.full(attention.shape, pad_token_id, dtype=np.int64)
    input_ids[attention] = np.concatenate([ids for pair in zip(prompts, responses) for ids in pair])
    out = PairBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention.astype(np.int64)),
        response_mask=torch.from_numpy(response_mask),
    )
    if schema.CHOSEN_POTENTIALS in batch:
        rows = [*batch[schema.CHOSEN_POTENTIALS], *batch[schema.REJECTED_POTENTIALS]]
        if [len(row) for row in rows] != response_lengths.tolist():
            raise ValueError("potentials must hold one value per response token")
        potentials = np.zeros(attention.shape, dtype=np.float32)
        potentials[response_mask] = np.concatenate([np.asarray(row) for row in rows])
        out.potentials = torch.from_numpy(potentials)
    if schema.REF_CHOSEN_LOGPS in batch:
        ref = np.concatenate([batch[schema.REF_CHOSEN_LOGPS], batch[schema.REF_REJECTED_LOGPS]])
        out.ref_logps = torch.from_numpy(ref.astype(np.float32))
    if schema.PAIR_ID in batch:
        out.pair_id = torch.tensor(np.asarray(batch[schema.PAIR_ID], dtype=np.int64))
    return out
