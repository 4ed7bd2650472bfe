"""A worker's shard, read in step with the other workers.

Shards may be uneven so that no pair is dropped (``ExactlyOnceDataConfig``): every step the
workers agree on how many pairs each of its micro-batches holds; a worker without data runs a
zero-weight placeholder pair, so that every worker joins each collective of the model (DDP's
gradient all-reduce in training, its buffer broadcast in evaluation); each micro-batch's loss is
weighted so that the step's gradient is the mean over all of its pairs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from tvkd_ray import schema
from tvkd_ray.errors import DataError


class Collective:
    """Rank, world size and the collectives of this Ray Train worker (no-ops when alone)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world = ctx.get_world_size()
        self.distributed = self.world > 1 and dist.is_available() and dist.is_initialized()

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """Every worker's ``value`` (any picklable object), in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def sum_by_key(self, sums: dict[str, float]) -> dict[str, float]:
        """Key-wise sums over the workers; a key some worker lacks counts 0 there (every worker
        must all-reduce the same keys, so they agree on the union first)."""
        keys = sorted({k for ks in self.gather(sorted(sums)) for k in ks})
        return dict(zip(keys, self.sum([sums.get(k, 0.0) for k in keys]), strict=True))


def drop_nonfinite(table: pa.Table, on_invalid: str) -> tuple[pa.Table, int]:
    """Pairs whose teacher potentials or reference log-probs are not finite are never trained on:
    they are named in a DataError (``on_invalid="error"``) or dropped and counted (``skip``)."""
    bad = np.zeros(table.num_rows, dtype=bool)
    for name in schema.POTENTIALS:
        if name in table.column_names:
            values = table.column(name).combine_chunks()
            nonfinite = ~np.isfinite(pc.list_flatten(values).to_numpy(zero_copy_only=False))
            if nonfinite.any():
                rows = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
                bad[rows[nonfinite]] = True
    for name in schema.REF_LOGPS:
        if name in table.column_names:
            bad |= ~np.isfinite(table.column(name).to_numpy(zero_copy_only=False))
    if not bad.any():
        return table, 0
    if on_invalid == "error":
        ids = table.column(schema.PAIR_ID).to_numpy()[bad]
        shown = ", ".join(str(i) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
        raise DataError(
            f"teacher potentials or reference log-probs are not finite for pair_id {shown}; "
            "check the teacher and reference models, or set data.on_invalid=skip to drop them"
        )
    return table.filter(pa.array(~bad)), int(bad.sum())


class ReplayedShard:
    """A dataset shard read in full once, then replayed from memory: the eval pairs are scored
    once per run however often the trainers evaluate (they are few, and their rows small)."""

    def __init__(self, shard):
        self.shard = shard
        self.batches: list | None = None

    def iter_batches(self, **kwargs):
        if self.batches is not None:
            yield from self.batches
            return
        read = []
        for batch in self.shard.iter_batches(**kwargs):
            read.append(batch)
            yield batch
        self.batches = read  # only a whole pass is replayed


class ShardReader:
    """Batches of a dataset shard as pyarrow Tables, leaving out pairs trained before a resume
    (``skip_ids``) and pairs with non-finite teacher/reference values (counted in ``nonfinite``).
    Iterating yields ``(table, seconds waited for it)``."""

    def __init__(self, shard, batch_size: int, on_invalid: str, skip_ids=None):
        self.shard, self.batch_size, self.on_invalid = shard, batch_size, on_invalid
        self.skip = pa.array(skip_ids) if skip_ids is not None and len(skip_ids) else None
        self.nonfinite = 0

    def __iter__(self) -> Iterator[tuple[pa.Table, float]]:
        batches = self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="pyarrow", prefetch_batches=2
        )
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - start
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
            if self.skip is not None:
                table = table.filter(pc.invert(pc.is_in(table[schema.PAIR_ID], self.skip)))
            table, dropped = drop_nonfinite(table, self.on_invalid)
            self.nonfinite += dropped
            if table.num_rows:
                yield table, waited


@dataclass
class MicroBatch:
    """One worker's share of a micro-step: ``weight`` scales its mean loss so that, summed over
    the step's micro-batches and averaged by DDP over the workers, the gradient is the mean over
    every pair of the step; a placeholder has weight 0 and is not counted."""

    table: pa.Table
    weight: float
    waited_s: float
    placeholder: bool


class Lockstep:
    """One pass over a worker's shard (a training epoch or an evaluation), step by step in step
    with the other workers; it remembers which pairs were read, for the checkpoint and the
    exactly-once audit."""

    def __init__(
        self, collective: Collective, reader: ShardReader, placeholder: pa.Table, consumed=None
    ):
        self.collective = collective
        self.reader = reader
        self.batches = iter(reader)
        self.placeholder = placeholder
        # Pair ids every worker trained this epoch before a resume.
        self.consumed = np.zeros(0, dtype=np.int64) if consumed is None else consumed
        self.seen: list[np.ndarray] = []  # pair ids this worker read since
        self.epoch_pairs = len(self.consumed)  # global count, the same on every worker
        self.exhausted = False

    def next_step(self, micro_steps: int) -> list[MicroBatch]:
        """This worker's micro-batches of the next step (at most ``micro_steps``; every worker
        gets as many), or [] once every worker's shard is empty. One all-reduce per step."""
        items = [next(self.batches, None) for _ in range(micro_steps)]
        local = [0.0 if item is None else float(item[0].num_rows) for item in items]
        counts = self.collective.sum(local)
        # Once every worker is out of pairs all later counts are 0 too.
        items = [item for item, count in zip(items, counts, strict=True) if count > 0]
        total = sum(counts)
        if total == 0:
            self.exhausted = True
            return []
        self.epoch_pairs += int(total)
        return [self._micro_batch(item, total) for item in items]

    def _micro_batch(self, item, step_pairs: float) -> MicroBatch:
        if item is None:
            return MicroBatch(self.placeholder, 0.0, 0.0, placeholder=True)
        table, waited = item
        self.seen.append(table.column(schema.PAIR_ID).to_numpy())
        weight = table.num_rows * self.collective.world / step_pairs
        return MicroBatch(table, weight, waited, placeholder=False)

    def trained_ids(self) -> np.ndarray:
        """Every pair id read in this pass so far, gathered from all workers."""
        mine = np.concatenate(self.seen) if self.seen else np.zeros(0, dtype=np.int64)
        return np.concatenate([self.consumed, *self.collective.gather(mine)])
