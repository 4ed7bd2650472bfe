"""What the suites of one invocation share: the plan (``--quick`` or full), the bench models
(config-built Llamas with the SmolLM2 tokenizer's vocabulary) and the batches they train on."""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from driver.inputs import Tokenizers, load_data
from tvkd_ray.config import BUNDLED_DATA, TVKDConfig, load_config
from tvkd_ray.data import tokenize_batch
from tvkd_ray.models import load_tokenizer

TOKENIZER = "smollm2-135m-instruct"  # its 49,152-token vocabulary; the models are config-built
TEACHER_SHAPE = {"layers": 8, "width": 256}
STUDENT_SHAPE = {"layers": 4, "width": 256}
BATCH_PAIRS = 8
STREAM_REPEATS = 4  # 248 batches: more than the pipeline's actors run ahead in the full plan
THREADS = os.cpu_count() or 1  # the single-process baselines use the whole machine
TARGETS = {"pipeline": 0.85, "wait_share": 0.05, "payload": 8.0, "trl": 1.7}
# A 1-minute load average above this many times the CPU count means other work competed with the
# benchmark. Its own runs reach ~1.6x on 2 CPUs: the pipeline keeps three processes runnable (the
# idle-priority actors count too), plus Ray's own.
BUSY_LOAD = 2.0


@dataclass(frozen=True)
class Plan:
    """How much each suite measures; ``--quick`` trades precision for minutes."""

    steps: int  # optimiser steps per timed training run (Ray fit, TRL, bare loop)
    warmup: int  # first steps of every run left out of the steady-state medians
    bare_rounds: int  # bare-loop passes in the pipeline suite: before, and after, the Ray run
    profile_batches: int  # batches of the per-stage profile at one thread (as in the pipeline)
    memory_cases: tuple[tuple[int, int], ...]  # (positions, vocab) of the teacher suite
    memory_repeats: int  # fresh processes per case and path (median taken)
    payload_batches: int  # batches of BATCH_PAIRS pairs per dataset in the payload suite


QUICK = Plan(
    steps=10,
    warmup=3,
    bare_rounds=1,
    profile_batches=3,
    memory_cases=((2048, 49152), (2048, 128256)),
    memory_repeats=1,
    payload_batches=2,
)
FULL = Plan(
    steps=60,
    warmup=6,
    bare_rounds=2,
    profile_batches=12,
    # The full-logits path peaks near 3x the logits: 8192 x 128k would need ~12 GiB.
    memory_cases=(
        (2048, 32000),
        (2048, 49152),
        (2048, 128256),
        (8192, 32000),
        (8192, 49152),
        (4096, 128256),
    ),
    memory_repeats=3,
    payload_batches=8,
)


class Bench:
    """What the suites of one invocation share: the plan, the output folder, a scratch folder
    for models and run outputs, and the models and batches (built once, on first use).
    ``models`` gives model directories by role instead of building them (the tests' tiny ones)."""

    def __init__(
        self, plan: Plan, out_dir: Path, scratch: Path, models: dict[str, str] | None = None
    ):
        self.plan = plan
        self.out_dir = out_dir
        self.scratch = scratch
        self._models: dict[str, str] = dict(models or {})
        self._batches: dict[str, list[pa.Table]] = {}
        self._pairs: dict[str, pa.Table] = {}

    def model(self, role: str) -> str:
        """Directory of the teacher or student model (random init, fixed seed)."""
        if role not in self._models:
            shape, seed = (TEACHER_SHAPE, 0) if role == "teacher" else (STUDENT_SHAPE, 1)
            self._models[role] = build_llama(self.scratch / "models" / role, seed=seed, **shape)
        return self._models[role]

    def data_path(self, data: str) -> Path:
        """Training pairs: ``bundled``, or ``stream``, the bundled pairs STREAM_REPEATS times over,
        for the pipeline suite, whose actors would otherwise run through the 62 bundled batches
        early in the run and leave the trainer alone for the rest of the measured steps."""
        bundled = BUNDLED_DATA / "train.jsonl"
        if data == "bundled":
            return bundled
        path = self.scratch / "stream.jsonl"
        if not path.exists():
            path.write_text(bundled.read_text() * STREAM_REPEATS)
        return path

    def config(self, name: str, overrides: list[str], data: str = "bundled") -> TVKDConfig:
        """A run config on the bench models and ``data``, plus ``overrides``."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = [
            f"run.name=bench-{name}-{stamp}",
            f"run.output_dir={self.scratch / 'runs'}",
            f"student.model={self.model('student')}",
            "student.num_layers=null",
            f"teacher.model={self.model('teacher')}",
            f"teacher.batch_size={BATCH_PAIRS}",
            f"reference.batch_size={BATCH_PAIRS}",
            f"data.train_path={self.data_path(data)}",
            "data.eval_path=null",
            f"train.batch_size={BATCH_PAIRS}",
            "train.log_every=1",
            f"tracking.uri=sqlite:///{self.out_dir.resolve() / 'mlflow.db'}",
            "tracking.experiment=tvkd-bench",
        ]
        return load_config(None, base + overrides)

    def pairs(self, data: str = "bundled") -> pa.Table:
        """The training pairs, validated and shuffled exactly as ``fit`` does."""
        if data not in self._pairs:
            cfg = self.config("data", [], data)
            self._pairs[data] = load_data(
                cfg, Tokenizers(load_tokenizer(self.model("student")))
            ).train
        return self._pairs[data]

    def batches(self, data: str = "bundled") -> list[pa.Table]:
        """Tokenised batches of BATCH_PAIRS pairs, in the order the Ray trainer receives them."""
        if data not in self._batches:
            cfg = self.config("data", [], data)
            tokens = tokenize_batch(
                self.pairs(data),
                load_tokenizer(self.model("student")),
                max_length=cfg.data.max_length,
                max_prompt_length=cfg.data.max_prompt_length,
            )
            self._batches[data] = [
                tokens.slice(i, BATCH_PAIRS) for i in range(0, tokens.num_rows, BATCH_PAIRS)
            ]
        return self._batches[data]


def build_llama(out_dir: Path, *, layers: int, width: int, seed: int) -> str:
    """A Llama of ``layers`` x ``width`` with the SmolLM2 tokenizer, saved with it to ``out_dir``.

    Shaped like SmolLM2 scaled down (64-wide heads, 2 query heads per KV head, the 8/3 MLP ratio,
    tied embeddings), so the 49,152-token LM head weighs as it does in the real models.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(TOKENIZER)
    heads = width // 64
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=math.ceil(8 * width / 3 / 64) * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)
