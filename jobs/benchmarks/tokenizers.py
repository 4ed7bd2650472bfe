"""``tokenizers``: a teacher with its own tokenizer (SPEC §2.3c). Seconds per batch of the teacher
actor on the same pairs with the student sharing its tokenizer (direct) and with the tiny preset's
1,024-token tokenizer (mapped: the teacher tokenises the student's text itself and maps its
potentials back), alternated batch by batch; and the bytes per student response token of what
the mapped teacher sends on."""

from __future__ import annotations

import statistics
import time

import measure_teacher
import numpy as np

from actors.teacher import TeacherPotentials, TeacherSpec
from benchmarks.common import BATCH_PAIRS, TARGETS, Bench
from benchmarks.report import table
from tvkd_ray import alignment, schema
from tvkd_ray.data import tokenize_batch
from tvkd_ray.models import load_tokenizer

MAPPED_TOKENIZER = "tiny-student"


def run(bench: Bench) -> tuple[dict, str]:
    n = bench.plan.payload_batches
    direct = bench.batches()[:n]
    lengths = bench.config("data", []).data
    aligned = tokenize_batch(
        bench.pairs().slice(0, n * BATCH_PAIRS),
        load_tokenizer(MAPPED_TOKENIZER),
        max_length=lengths.max_length,
        max_prompt_length=lengths.max_prompt_length,
        align=True,
    )
    mapped = [aligned.slice(i * BATCH_PAIRS, BATCH_PAIRS) for i in range(n)]
    teacher = TeacherPotentials(TeacherSpec(bench.model("teacher"), dtype="float32"))
    teacher(direct[0])  # warm-up, both paths
    teacher(mapped[0])
    seconds = {"direct": [], "mapped": []}
    outs = {"direct": [], "mapped": []}
    for plain, aligned_batch in zip(direct, mapped):
        for name, batch in (("direct", plain), ("mapped", aligned_batch)):
            started = time.perf_counter()
            outs[name].append(teacher(batch))
            seconds[name].append(time.perf_counter() - started)
    tokens = sum(measure_teacher.count(t, schema.CHOSEN_IDS, schema.REJECTED_IDS) for t in mapped)
    direct_tokens = sum(
        measure_teacher.count(t, schema.CHOSEN_IDS, schema.REJECTED_IDS) for t in direct
    )
    mapping = [_mapping_seconds(batch, teacher) for batch in mapped]
    sent = list(schema.TEACHER.names)
    arrow = sum(out.select(sent).nbytes for out in outs["mapped"]) / tokens
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    rows = [[name, medians[name], len(seconds[name])] for name in seconds]
    text = table(["student tokenizer", "teacher s/batch (median)", "batches"], rows)
    text += (
        f"\nmapped / direct: {medians['mapped'] / medians['direct']:.2f}x, of which the mapping "
        f"(teacher tokenisation + index) {statistics.median(mapping):.4f} s/batch; response "
        f"tokens {direct_tokens} direct, {tokens} mapped (student's); mapped payload "
        f"{arrow:.2f} B per student response token (target <= {TARGETS['payload']:.0f})"
    )
    return {
        "seconds_per_batch": seconds,
        "median_seconds_per_batch": medians,
        "mapped_over_direct": medians["mapped"] / medians["direct"],
        "median_mapping_seconds_per_batch": statistics.median(mapping),
        "direct_response_tokens": direct_tokens,
        "mapped_arrow_bytes_per_student_token": arrow,
        "student_response_tokens": tokens,
        "mapped_tokenizer": MAPPED_TOKENIZER,
        "batch_pairs": BATCH_PAIRS,
    }, text


def _mapping_seconds(batch, teacher: TeacherPotentials) -> float:
    """The mapped path's own work, without the forward: the teacher's tokenisation of the
    student's text and the index from each student state to a teacher state."""
    started = time.perf_counter()
    _, chars = alignment.teacher_tokens(batch, teacher.tokenizer)
    for _, column in alignment.RESPONSE_COLUMNS:
        for t, s in zip(chars[column].to_pylist(), batch[column].to_pylist()):
            alignment.align(np.asarray(t), np.asarray(s))
    return time.perf_counter() - started
