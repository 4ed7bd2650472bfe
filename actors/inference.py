"""What the teacher and reference actors share: load a frozen model once, place it, and run the
response-only forward of ``tvkd_ray.forward`` on tokenised pair batches."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from actors.faults import maybe_crash
from actors.progress import report
from tvkd_ray import schema
from tvkd_ray.data import PairBatch, collate
from tvkd_ray.forward import autocast, autocast_dtype, response_hidden
from tvkd_ray.models import load_model, load_tokenizer


def resolve_dtype(dtype: str, device_type: str) -> str:
    """A weights dtype: ``auto`` is bfloat16 on a GPU and float32 on CPU."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


@dataclass(frozen=True)
class FrozenModelSpec:
    """Everything a frozen-model actor needs, built once per role by the driver from its config
    section; the cache fingerprint is derived from the same spec (``output_fields``)."""

    model: str
    dtype: str = "auto"
    autocast: str = "auto"  # the dtype the forward computes in (tvkd_ray.forward.autocast_dtype)
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    num_gpus: float = 0.0
    num_threads: int | None = None  # torch threads of the actor's process; None: torch's own
    device_map: dict[str, str] | None = None  # accelerate's; None: the device, or auto (place)
    offload_folder: str | None = None  # for the device_map's disk entries
    # On CPU the actors share cores with the trainers, and Ray Data lets them run ahead: at equal
    # priority they slowed the trainer's step, the critical path, 1.7-2x (docs/BENCHMARKS.md).
    # Under SCHED_IDLE they take only the cycles left over.
    idle_priority: bool = False

    # Fields that only place the work; every other field changes what the actor computes.
    PLACEMENT: ClassVar[tuple[str, ...]] = (
        "num_gpus",
        "num_threads",
        "device_map",
        "offload_folder",
        "idle_priority",
    )
    # Fields naming a model, fingerprinted by their files' content.
    MODELS: ClassVar[tuple[str, ...]] = ("model",)

    @property
    def device_type(self) -> str:
        """Where the actor computes: a GPU whenever it reserves (a share of) one."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    def output_fields(self) -> dict:
        """The fields that decide the actor's output (what a cache must be keyed on): the
        settings, the device type and the numerics resolved on it."""
        fields = {k: v for k, v in asdict(self).items() if k not in self.PLACEMENT}
        fields["device"] = self.device_type
        fields["dtype"] = resolve_dtype(self.dtype, self.device_type)
        fields["autocast"] = autocast_dtype(self.autocast, self.device_type)
        return fields


def place(spec: FrozenModelSpec) -> tuple[str, str, str | dict | None]:
    """(device, dtype, device_map): a GPU when reserved and present; ``auto`` dtype resolved
    there (bf16 on a GPU, fp32 on CPU); the spec's device_map, if any."""
    device = "cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    # A teacher larger than one GPU is spread over the actor's GPUs by accelerate.
    device_map = spec.device_map or ("auto" if device == "cuda" and spec.num_gpus > 1 else None)
    return device, resolve_dtype(spec.dtype, device), device_map


class FrozenModel:
    """A frozen causal LM in eval mode, scoring the response tokens of collated pair batches."""

    role = "frozen"

    def __init__(self, spec: FrozenModelSpec, board=None, stage: str = ""):
        self.spec = spec
        self.board, self.stage = board, stage  # where each scored block is counted
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.device, self.dtype, self.device_map = place(spec)
        self.autocast = autocast_dtype(spec.autocast, self.device)
        if spec.idle_priority and self.device == "cpu" and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        self.model = self.load(spec.model)
        self.tokenizer = load_tokenizer(spec.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.batches = 0

    def __call__(self, table: pa.Table) -> pa.Table:
        """The Ray Data map: ``table`` with this role's columns appended, counted on the board."""
        out = self.annotate(table)
        report(self.board, "add", self.stage, table.num_rows)
        return out

    def annotate(self, table: pa.Table) -> pa.Table:
        raise NotImplementedError

    def load(self, name: str):
        """Load a frozen model with this actor's placement."""
        model = load_model(
            name,
            dtype=self.dtype,
            device_map=self.device_map,
            offload_folder=self.spec.offload_folder,
            trust_remote_code=self.spec.trust_remote_code,
            attn_implementation=self.spec.attn_implementation,
        )
        if self.device_map is None:
            model = model.to(self.device)
        return model.eval().requires_grad_(False)

    def precision(self):
        """The autocast context every forward of this actor runs in (as the student's)."""
        return autocast(self.autocast, self.device)

    def forward_batch(self, table: pa.Table) -> PairBatch:
        """Collated batch on the model's input device (chosen rows, then rejected rows)."""
        self.batches += 1
        maybe_crash(self.role, self.batches)
        batch = collate(table.select(list(schema.TOKEN_IDS)), self.pad_id)
        weight = self.model.get_input_embeddings().weight
        # An offloaded embedding has a meta weight; accelerate's hook moves the inputs for it.
        return batch.to(self.device if weight.device.type == "meta" else weight.device)

    def hidden(self, model, batch: PairBatch) -> torch.Tensor:
        return response_hidden(model, batch.input_ids, batch.attention_mask, batch.response_mask)

    def score(self, table: pa.Table):
        """(batch, hidden states at response-predicting positions, LM-head module)."""
        batch = self.forward_batch(table)
        return batch, self.hidden(self.model, batch), self.model.get_output_embeddings()


def with_timing(out: pa.Table, column: str, started: float) -> pa.Table:
    """Add this actor's compute seconds per pair, so the trainer can log the pool's tokens/s
    (4 bytes a pair)."""
    seconds = (time.perf_counter() - started) / max(out.num_rows, 1)
    return out.append_column(column, pa.array(np.full(out.num_rows, seconds, dtype=np.float32)))


def split_rows(values: np.ndarray, response_mask: torch.Tensor, num_pairs: int):
    """Flat per-token values (row-major over the 2B rows) -> (chosen, rejected) list arrays."""
    lengths = response_mask.sum(dim=1).cpu().numpy()
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    cut = offsets[num_pairs]
    chosen = pa.ListArray.from_arrays(pa.array(offsets[: num_pairs + 1]), pa.array(values[:cut]))
    rejected = pa.ListArray.from_arrays(pa.array(offsets[num_pairs:] - cut), pa.array(values[cut:]))
    return chosen, rejected
