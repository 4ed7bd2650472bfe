"""Teacher figures for SPEC §7, measured side by side on this machine.

    .venv/bin/python jobs/measure_teacher.py [--json teacher.json]

(a) payload: Arrow bytes per response token that the teacher adds to each batch, i.e. what
    crosses the object store to the trainers: Φ only (target ≤ 8) and Φ plus top-k (k = 32);
(b) memory: peak RSS growth of the potential computation on an [8, 1024]-token batch with a
    49,152-token vocabulary (hidden 576, random LM head): chunked ``soft_value_from_hidden`` vs
    full logits then ``soft_value``, each in a fresh process;
(c) speed: teacher tokens/s with SmolLM2-135M-Instruct (fp32, 2 threads) through
    ``TeacherPotentials`` vs a bare loop (``model(...).logits`` + ``soft_value``), same batches,
    interleaved, medians.

Batches are HH-RLHF pairs tokenised with the teacher's tokenizer (prompt + response ≤ 64 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

# Runs as a script from a checkout: make the packages importable.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actors.teacher import TeacherPotentials, TeacherSpec  # noqa: E402
from tvkd_ray import schema  # noqa: E402
from tvkd_ray.data import collate, load_pairs, tokenize_batch  # noqa: E402
from tvkd_ray.forward import predicting_positions  # noqa: E402
from tvkd_ray.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from tvkd_ray.potentials import soft_value  # noqa: E402
from tvkd_ray.runtime import ACTOR_ALLOCATOR_ENV  # noqa: E402

TEACHER = "smollm2-135m-instruct"
HH_PAIRS = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "pairs.jsonl.gz"
TOP_K = 32
THREADS = 2

# Peak RSS growth (KiB) of one potential computation, run in a fresh interpreter. Clearing the
# kernel's high-water mark (VmHWM) after a warm-up makes it measure the computation alone
# (ru_maxrss would not do: it also keeps the peaks recorded when any thread exited).
_MEMORY_PROBE = """
import sys, time, torch
from tvkd_ray.potentials import soft_value, soft_value_from_hidden

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

torch.set_num_threads({threads})
torch.manual_seed(0)
hidden = torch.randn({positions}, {hidden_size})
weight = torch.randn({vocab}, {hidden_size}) / {hidden_size} ** 0.5
head = torch.nn.Linear({hidden_size}, {vocab}, bias=False).requires_grad_(False)
head.weight.copy_(weight)
if sys.argv[1] == "chunked":
    run = lambda h: soft_value_from_hidden(h, head)
else:
    run = lambda h: soft_value(torch.nn.functional.linear(h, weight))
run(hidden[:8])  # warm up kernels and thread pools
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
start = time.perf_counter()
run(hidden)
print(status_kib("VmHWM") - before, time.perf_counter() - start)
"""


def batches(num_batches: int, pairs_per_batch: int, max_length: int) -> list[pa.Table]:
    """Tokenised HH-RLHF pairs, ``num_batches`` tables of ``pairs_per_batch`` pairs."""
    pairs = load_pairs(HH_PAIRS, on_invalid="skip").table.slice(0, num_batches * pairs_per_batch)
    tokens = tokenize_batch(
        pairs, load_tokenizer(TEACHER), max_length=max_length, max_prompt_length=max_length // 2
    )
    return [tokens.slice(i * pairs_per_batch, pairs_per_batch) for i in range(num_batches)]


def count(table: pa.Table, *columns: str) -> int:
    """Total length of the list columns ``columns`` (tokens)."""
    return sum(pc.sum(pc.list_value_length(table[column])).as_py() for column in columns)


def payload(tables: list[pa.Table], teacher_dir: str) -> dict[str, float]:
    """Bytes per response token of the columns the teacher adds: Arrow ``nbytes`` and the size
    of their Arrow IPC stream (framing and schema included, as the object store holds blocks)."""
    teacher = TeacherPotentials(TeacherSpec(teacher_dir, top_k=TOP_K, dtype="float32"))
    outs = [teacher(table) for table in tables]
    tokens = sum(count(table, schema.CHOSEN_IDS, schema.REJECTED_IDS) for table in tables)
    modes = {
        "potentials only": [schema.CHOSEN_POTENTIALS, schema.REJECTED_POTENTIALS],
        f"potentials + top-{TOP_K}": [
            schema.CHOSEN_POTENTIALS,
            schema.REJECTED_POTENTIALS,
            schema.CHOSEN_TOPK_IDS,
            schema.CHOSEN_TOPK_LOGPS,
        ],
    }
    result = {"response_tokens": tokens}
    for mode, columns in modes.items():
        nbytes = sum(out.select(columns).nbytes for out in outs)
        ipc = sum(_ipc_bytes(out.select(columns)) for out in outs)
        result[mode] = {
            "arrow_bytes_per_token": nbytes / tokens,
            "ipc_bytes_per_token": ipc / tokens,
        }
    return result


def _ipc_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().size


def memory(positions: int, hidden_size: int, vocab: int) -> dict[str, dict[str, float]]:
    probe = _MEMORY_PROBE.format(
        threads=THREADS, positions=positions, hidden_size=hidden_size, vocab=vocab
    )
    result = {}
    for mode in ("chunked", "full"):
        proc = subprocess.run(
            [sys.executable, "-c", probe, mode],
            cwd=REPO,
            # The actors' allocator (not the bench's): RSS shows the tensors alive at once.
            env={**os.environ, **ACTOR_ALLOCATOR_ENV},
            capture_output=True,
            text=True,
            check=True,
        )
        kib, seconds = proc.stdout.split()
        result[mode] = {"peak_rss_growth_mib": int(kib) / 1024, "seconds": float(seconds)}
    result["full_logits_fp32_mib"] = positions * vocab * 4 / 2**20
    return result


@torch.inference_mode()
def bare_forward(model, pad_id: int, table: pa.Table) -> torch.Tensor:
    """The baseline: the whole-sequence logits, then Φ at the positions predicting responses."""
    batch = collate(table.select(list(schema.TOKEN_IDS)), pad_id)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return soft_value(logits[predicting_positions(batch.response_mask)])


def speed(tables: list[pa.Table], teacher_dir: str, rounds: int) -> dict[str, float]:
    """Median tokens/s (prompt + response tokens, padding excluded) over every batch and round,
    the two paths interleaved batch by batch so machine load hits both alike."""
    teacher = TeacherPotentials(TeacherSpec(teacher_dir, dtype="float32"))
    model = load_model(teacher_dir).eval()
    pad_id = load_tokenizer(teacher_dir).pad_token_id
    paths = {
        "TeacherPotentials": teacher,
        "bare forward loop": lambda table: bare_forward(model, pad_id, table),
    }
    for run in paths.values():  # warm-up
        run(tables[0])
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for table in tables:
            # Each pair is two sequences, both starting with the prompt.
            tokens = 2 * count(table, schema.PROMPT_IDS) + count(
                table, schema.CHOSEN_IDS, schema.REJECTED_IDS
            )
            for name, run in paths.items():
                start = time.perf_counter()
                run(table)
                rates[name].append(tokens / (time.perf_counter() - start))
    result = {name: statistics.median(values) for name, values in rates.items()}
    result["ratio"] = result["TeacherPotentials"] / result["bare forward loop"]
    result["samples_per_path"] = len(tables) * rounds
    return result


def load_average() -> float:
    """1-minute load average: the cores are shared, and the timings depend on it."""
    return os.getloadavg()[0]


def print_payload(p: dict) -> None:
    print(f"(a) teacher -> trainer payload, {p['response_tokens']} response tokens")
    print(f"    {'mode':<22} {'Arrow B/token':>14} {'IPC B/token':>12}")
    for mode in ("potentials only", f"potentials + top-{TOP_K}"):
        arrow, ipc = p[mode]["arrow_bytes_per_token"], p[mode]["ipc_bytes_per_token"]
        print(f"    {mode:<22} {arrow:>14.2f} {ipc:>12.2f}", flush=True)


def print_memory(m: dict) -> None:
    print(
        f"(b) potential memory, [8, 1024] tokens, vocab 49152, hidden 576 "
        f"(full fp32 logits = {m['full_logits_fp32_mib']:.0f} MiB)"
    )
    print(f"    {'path':<40} {'peak RSS growth MiB':>20} {'s':>6}")
    labels = {"chunked": "soft_value_from_hidden (chunked)", "full": "full logits, then soft_value"}
    for mode, label in labels.items():
        growth, seconds = m[mode]["peak_rss_growth_mib"], m[mode]["seconds"]
        print(f"    {label:<40} {growth:>20.0f} {seconds:>6.2f}", flush=True)


def print_speed(s: dict, args: argparse.Namespace) -> None:
    print(
        f"(c) teacher speed, {TEACHER} fp32, {THREADS} threads, {args.batches} batches x "
        f"{args.pairs} pairs, prompt + response <= {args.max_length} tokens, "
        f"median of {s['samples_per_path']}"
    )
    print(f"    {'path':<22} {'tokens/s':>9}")
    for name in ("TeacherPotentials", "bare forward loop"):
        print(f"    {name:<22} {s[name]:>9.0f}")
    print(f"    ratio {s['ratio']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    parser.add_argument("--max-length", type=int, default=64, help="prompt + response tokens")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes over the batches")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    teacher_dir = resolve_model(TEACHER)
    tables = batches(args.batches, args.pairs, args.max_length)

    # Each part prints as soon as it is measured: the speed part takes minutes on a busy machine.
    figures = {"load_average_start": load_average()}
    figures["payload"] = payload(tables, teacher_dir)
    print_payload(figures["payload"])
    figures["memory"] = memory(positions=8 * 1024, hidden_size=576, vocab=49152)
    print_memory(figures["memory"])
    figures["speed"] = speed(tables, teacher_dir, args.rounds)
    print_speed(figures["speed"], args)
    figures["load_average_end"] = load_average()
    print(
        f"1-min load average on {os.cpu_count()} cores: {figures['load_average_start']:.1f} at "
        f"start, {figures['load_average_end']:.1f} at end (other processes share the cores)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
