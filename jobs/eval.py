"""Offline evaluation of a trained model: preference accuracy on pairs, or multiple choice.

    python jobs/eval.py --model DIR [--ref-model DIR] --data pairs.jsonl [--beta 0.1]
        [--format auto] [--max-length 256] [--max-prompt-length 128] [--batch-size 8]
    python jobs/eval.py --task multiple_choice --model DIR --data hellaswag.jsonl [--max-length 512]

``--model`` / ``--ref-model`` take a directory, a hub id or a preset name. Each run prints one JSON
object on stdout. Bad input ends with one ``error: ...`` line and exit status 2; ``--debug`` shows
the traceback.

Preference task: pairs in any format of SPEC §4 (invalid rows are skipped and counted), scored by
the implicit DPO reward r = β·(log π(y|x) − log π_ref(y|x)); ``preference_accuracy`` is the share
of pairs whose chosen reward is strictly above the rejected one, ``mean_margin`` the mean of
r_chosen − r_rejected. Without ``--ref-model`` pairs are ranked by the model's own sequence
log-prob (margin = log π(chosen|x) − log π(rejected|x), no β). Responses are tokenised, collated
and scored by the same code as training (EOS appended, same truncation).

Multiple-choice task: HellaSwag-format JSONL rows ``{"ctx": str, "endings": [str, ...], "label":
int}`` (a digit string label, as in the Hugging Face copy, is accepted). Each ending is scored as
a continuation of ``ctx`` preceded by one space, as in lm-eval-harness, by its log-likelihood
divided by its number of tokens (lm-eval's ``acc_norm`` divides by bytes instead); the highest
score is the prediction. Contexts longer than ``--max-length`` lose their first tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Runs as a script from a checkout or a Ray job's working directory: make the packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from tvkd_ray.data import (  # noqa: E402
    FORMATS,
    collate,
    load_pairs,
    tokenize_batch,
    truncation_counts,
)
from tvkd_ray.errors import DataError, TVKDError  # noqa: E402
from tvkd_ray.forward import ResponseLogps, row_sums  # noqa: E402
from tvkd_ray.loss import tie_tolerance  # noqa: E402
from tvkd_ray.models import check_tokenizers_compatible, load_model, load_tokenizer  # noqa: E402

# ------------------------------------------------------------------------------------ scoring


def sequence_logps(
    model: torch.nn.Module, input_ids, attention_mask, response_mask
) -> torch.Tensor:
    """Summed log-prob [rows] of each row's response tokens (right-padded rows)."""
    device = model.get_input_embeddings().weight.device
    ids, attention, mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
    logps, _ = ResponseLogps(model)(ids, attention, mask)
    return row_sums(logps, mask).double().cpu()


@torch.inference_mode()
def reward_margins(
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    tokens: pa.Table,
    pad_token_id: int,
    *,
    beta: float = 0.1,
    batch_size: int = 8,
) -> np.ndarray:
    """r_chosen − r_rejected per tokenised pair (log π(chosen) − log π(rejected) without ref),
    with 0 for a tie: a margin within ``TIE_RTOL`` of the log-probs' magnitude (as in training)."""
    margins = []
    for start in range(0, tokens.num_rows, batch_size):
        batch = collate(tokens.slice(start, batch_size), pad_token_id)
        rows = (batch.input_ids, batch.attention_mask, batch.response_mask)
        logps = sequence_logps(model, *rows)
        scored = [batch.sides(logps)]  # the pair's log-probs, for the tie tolerance
        if ref_model is not None:
            ref_logps = sequence_logps(ref_model, *rows)
            scored.append(batch.sides(ref_logps))
            logps = beta * (logps - ref_logps)
        sides = batch.sides(logps)
        margin = sides.chosen - sides.rejected
        each = [t for pair in scored for t in (pair.chosen, pair.rejected)]
        tie = margin.abs() <= tie_tolerance(beta if ref_model is not None else 1.0, *each)
        margins.append(torch.where(tie, 0.0, margin))
    return torch.cat(margins).numpy()


def preference_scores(
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    tokenizer: Any,
    table: pa.Table,
    *,
    beta: float = 0.1,
    max_length: int = 256,
    max_prompt_length: int = 128,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Preference accuracy and mean margin of normalised pairs (``load_pairs(...).table``)."""
    tokens = tokenize_batch(
        table, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length
    )
    margins = reward_margins(
        model, ref_model, tokens, tokenizer.pad_token_id, beta=beta, batch_size=batch_size
    )
    return {
        "preference_accuracy": float((margins > 0).mean()),
        "mean_margin": float(margins.mean()),
        "n": len(margins),
        "truncated": truncation_counts(tokens),
    }


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _right_padded(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> tuple:
    """(input_ids, attention_mask, response_mask) of (context, continuation) rows, right-padded
    as in a collated batch, the continuation as the response."""
    lengths = torch.tensor([len(context) + len(ending) for context, ending in rows])
    input_ids = torch.full((len(rows), int(lengths.max())), pad_token_id)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, (context, ending) in enumerate(rows):
        input_ids[row, : lengths[row]] = torch.tensor(context + ending)
        response_mask[row, len(context) : lengths[row]] = True
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    return input_ids, attention_mask, response_mask


@torch.inference_mode()
def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    items: list[dict[str, Any]],
    *,
    max_length: int = 512,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Share of ``items`` ({ctx, endings, label}) whose best length-normalised ending is label."""
    correct = truncated = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rows = []
        for item in chunk:
            context = _encode(tokenizer, item["ctx"].rstrip())
            endings = [_encode(tokenizer, " " + text.lstrip()) for text in item["endings"]]
            truncated += len(context) + max(map(len, endings)) > max_length
            for ending in endings:
                # One context token always stays: the first token of a row is never predicted.
                ending = ending[: max_length - 1]
                rows.append((context[-(max_length - len(ending)) :], ending))
        padded = _right_padded(rows, tokenizer.pad_token_id)
        scores = sequence_logps(model, *padded) / padded[2].sum(dim=1)
        for item, item_scores in zip(chunk, scores.split([len(i["endings"]) for i in chunk])):
            correct += int(item_scores.argmax()) == item["label"]
    return {"accuracy": correct / len(items), "n": len(items), "truncated": truncated}


# ------------------------------------------------------------------------------------- data


def _choice_item(row: Any, where: str) -> dict[str, Any]:
    """A validated HellaSwag row; a DataError names ``where`` and the faulty field."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    ctx, endings, label = row.get("ctx"), row.get("endings"), row.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise DataError(f"{where}, field 'ctx': expected a non-empty string")
    if not (
        isinstance(endings, list)
        and len(endings) >= 2
        and all(isinstance(text, str) and text.strip() for text in endings)
    ):
        raise DataError(
            f"{where}, field 'endings': expected a list of two or more non-empty strings"
        )
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy stores "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise DataError(
            f"{where}, field 'label': expected an index of 'endings' (0..{len(endings) - 1}), "
            f"got {row.get('label')!r}"
        )
    return {"ctx": ctx, "endings": endings, "label": label}


def load_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """HellaSwag-format rows of a JSONL file; the first bad row raises DataError (line, field)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    items = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
                raise DataError(f"{where}: {problem}") from None
            items.append(_choice_item(row, where))
    if not items:
        raise DataError(f"{path}: contains no rows")
    return items


# -------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like any other bad input: one ``error:`` line, exit status 2."""

    def error(self, message: str):
        raise TVKDError(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(
        prog="python jobs/eval.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=("preference", "multiple_choice"), default="preference")
    parser.add_argument("--model", required=True, help="directory, hub id or preset name")
    parser.add_argument(
        "--ref-model", help="reference model; without it pairs are ranked by own log-probs"
    )
    parser.add_argument("--data", required=True, help="pairs (SPEC §4) or HellaSwag JSONL")
    parser.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="pairs format")
    parser.add_argument(
        "--max-length", type=int, help="tokens per sequence (default 256; multiple_choice 512)"
    )
    parser.add_argument("--max-prompt-length", type=int, default=128, help="prompt tokens")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs or items per forward")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors")
    args = parser.parse_args(argv)
    preference = args.task == "preference"
    if args.max_length is None:
        args.max_length = 256 if preference else 512
    if args.batch_size < 1:
        raise TVKDError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_length < 2:
        raise TVKDError(f"--max-length must be >= 2, got {args.max_length}")
    if not preference and args.ref_model is not None:
        raise TVKDError("--ref-model is not used by --task multiple_choice")
    if preference and args.beta <= 0:
        raise TVKDError(f"--beta must be > 0, got {args.beta}")
    if preference and not 0 < args.max_prompt_length < args.max_length:
        raise TVKDError(
            f"--max-prompt-length must be in (0, --max-length={args.max_length}), "
            f"got {args.max_prompt_length}"
        )
    return args


def _load(name: str) -> torch.nn.Module:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_model(name, dtype="float32").to(device).eval()


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON result of one command line; tokenizers and data are checked before any model."""
    tokenizer = load_tokenizer(args.model)
    if args.task == "multiple_choice":
        items = load_multiple_choice(args.data)
        scores = multiple_choice_accuracy(
            _load(args.model),
            tokenizer,
            items,
            max_length=args.max_length,
            batch_size=args.batch_size,
        )
        return {"task": args.task, "model": args.model, "data": args.data, **scores}
    if args.ref_model is not None:
        check_tokenizers_compatible(
            tokenizer,
            load_tokenizer(args.ref_model),
            f"model tokenizer '{args.model}'",
            f"reference tokenizer '{args.ref_model}'",
        )
    pairs = load_pairs(args.data, format=args.format, tokenizer=tokenizer, on_invalid="skip")
    ref_model = None if args.ref_model is None else _load(args.ref_model)
    scores = preference_scores(
        _load(args.model),
        ref_model,
        tokenizer,
        pairs.table,
        beta=args.beta,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        batch_size=args.batch_size,
    )
    return {
        "task": args.task,
        "model": args.model,
        "ref_model": args.ref_model,
        "data": pairs.source,
        "format": pairs.format,
        "beta": None if ref_model is None else args.beta,
        **scores,
        "skipped": pairs.skipped,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        result = evaluate(parse_args(argv))
    except TVKDError as exc:
        if "--debug" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
