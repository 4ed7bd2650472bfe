"""The scored streams (SPEC §3): pairs → tokenise → teacher pool → reference pool → Ray Train.

Everything before Ray Train is lazy Ray Data plans, and only small Arrow columns (Φ per response
token, two log-probs per pair) flow on to the trainers. Each training epoch is its own dataset, in
its own seeded order. Each pool's ``cache`` decides when its work is done: ``auto`` streams in the
first epoch and keeps what passed in Parquet for the later epochs and for reruns; ``none``
streams inside every epoch's plan; ``memory`` and a directory score every pair before training
(kept in the object store, or in Parquet). Pools scored before training come first, then
``auto``, then ``none``, so a pool that streams every epoch never makes a cached one run again.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from actors.progress import report
from driver import pools
from driver.cache import CachedRows, PartWriter, ScoreCache, blocks, fingerprint, in_order
from driver.inputs import ModelPaths, PairData
from tvkd_ray import schema
from tvkd_ray.config import TVKDConfig, resolve_path
from tvkd_ray.data import tokenize_dataset

logger = logging.getLogger(__name__)
AUTO = "auto"
AUTO_FOLDER = "score-cache"  # under run.output_dir: runs of one output root share their scores
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node's own label


@dataclass
class Streams:
    """The datasets handed to Ray Train and what the driver learnt building them."""

    train: list[ray.data.Dataset]  # one per epoch, each in its own order
    eval: ray.data.Dataset | None
    num_train_pairs: int
    rows_per_block: int
    data_report: dict[str, Any] = field(default_factory=dict)
    to_seal: list[tuple[ScoreCache, int]] = field(default_factory=list)  # auto entries


def auto_root(cfg: TVKDConfig) -> Path:
    """Where ``cache: auto`` keeps its entries."""
    return resolve_path(cfg.run.output_dir) / AUTO_FOLDER


def driver_node_label() -> dict[str, str]:
    """The label selector that places an actor on the driver's node."""
    return {NODE_ID_LABEL: ray.get_runtime_context().get_node_id()}


def rows_per_block(cfg: TVKDConfig) -> int:
    """Pairs per Ray Data block: the largest batch of the pools that run (the unit they stream),
    or the trainers' batch in a run without pools."""
    return max((p.batch_size for p in cfg.pools().values()), default=cfg.train.batch_size)


def epoch_orders(num_pairs: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Row order of each epoch: the first as the driver shuffled the pairs (``run.seed``), every
    later one a fresh permutation seeded by (run.seed, epoch), so a resumed run replays it."""
    first = np.arange(num_pairs)
    later = [np.random.default_rng([seed, e]).permutation(num_pairs) for e in range(1, epochs)]
    return [first, *later]


class StreamPlanner:
    """Plans the scored datasets of one run: each split's pools grouped by cache, the progress
    board every pool reports its pairs to, and the ``auto`` entries to seal after training."""

    def __init__(self, cfg: TVKDConfig, paths: ModelPaths, board):
        self.cfg, self.paths, self.board = cfg, paths, board
        self.per_block = rows_per_block(cfg)
        self.to_seal: list[tuple[ScoreCache, int]] = []
        self.pairs_left: dict[str, int] = {}  # by stage: pairs a max_steps run still needs
        # Parts of ``auto`` are written and read on the driver's node: the cache is its folder.
        self.driver_node = driver_node_label()

    def datasets(self, table: pa.Table, split: str, orders: list[np.ndarray]) -> list:
        """``table``'s pairs tokenised and scored by every pool of the run, one dataset per row
        order: pools with memory or a directory run now, before any order is taken; ``auto``
        streams in the first order and is read back in the others (or read, once sealed); pools
        with ``cache: none`` stream within each dataset."""
        stages = self._cache_stages(table, split)
        auto = next((stage for stage in stages if stage[0] == AUTO), None)
        if auto is not None and auto[2].seal(table.num_rows):
            auto = None  # a whole entry: read like a directory's
        before = [stage for stage in stages if stage[0] != "none" and stage is not auto]
        rows = self._cached_rows(table, split, before)
        if auto is None:
            datasets = [self._source(table, rows, order) for order in orders]
        else:
            datasets = self._auto_epochs(table, split, rows, orders, auto)
        streaming = [role for cache, group, _ in stages if cache == "none" for role in group]
        return [self._streamed(ds, streaming, split, table.num_rows) for ds in datasets]

    def _streamed(self, ds, roles: list[pools.Role], split: str, num_pairs: int):
        """``ds`` through the pools that stream in every epoch (``cache: none``)."""
        for role in roles:
            ds = self._through(ds, role, split, num_pairs)
        return ds

    def _source(self, table: pa.Table, rows: pa.Table | None, order: np.ndarray):
        """The pairs in ``order``: scored ``rows`` if any, else tokenised afresh."""
        if rows is not None:
            return blocks(
                in_order(rows, table[schema.PAIR_ID].take(pa.array(order))), self.per_block
            )
        return tokenize_dataset(
            blocks(table.take(pa.array(order)), self.per_block),
            self.paths.tokenizer,
            max_length=self.cfg.data.max_length,
            max_prompt_length=self.cfg.data.max_prompt_length,
            batch_size=self.per_block,
            num_cpus=pools.TOKENIZE_CPUS,
            max_actors=1,
            align=self.paths.cross_tokenizer,
        )

    def _through(self, ds, role: pools.Role, split: str, num_pairs: int, capped: bool = True):
        """``ds`` through ``role``'s pool, each block counted on the progress board. A stream in
        a run that ``train.max_steps`` ends early expects only the training pairs those steps
        still need, over all its epochs."""
        stage = f"{role.name} {split}"
        train = self.cfg.train
        if capped and split == "train" and train.max_steps is not None:
            per_step = train.batch_size * train.grad_accum * train.num_workers
            left = self.pairs_left.setdefault(stage, train.max_steps * per_step)
            num_pairs = min(num_pairs, left)
            self.pairs_left[stage] = left - num_pairs
        report(self.board, "expect", stage, num_pairs, "pairs")
        return pools.through_pool(ds, role, self.board, stage)

    def _cached_rows(self, table: pa.Table, split: str, stages) -> pa.Table | None:
        """The pairs scored by every pool that runs before training (None without one). The
        last Parquet entry that exists holds every column scored before it: start there, so no
        pool before it runs."""
        rows = None
        hits = [i for i, (_, _, entry) in enumerate(stages) if entry is not None and entry.exists]
        if hits:
            rows = stages[hits[-1]][2].read_rows()
            stages = stages[hits[-1] + 1 :]
        for _, group, entry in stages:
            order = np.arange(table.num_rows)
            ds = self._source(table, rows, order)
            for role in group:
                ds = self._through(ds, role, split, table.num_rows, capped=False)
            if entry is None:  # memory
                rows = pa.concat_tables(ray.get(ds.to_arrow_refs()))
            else:
                entry.write(ds)
                rows = entry.read_rows()
        return rows

    def _auto_epochs(self, table, split, rows, orders, stage) -> list:
        """``auto``: the first order streams through the pools and is written as it passes
        (pairs an earlier, stopped run wrote come first, from its parts); later orders read the
        parts back."""
        _, group, entry = stage
        ids = table[schema.PAIR_ID].take(pa.array(orders[0]))
        done = entry.partial_rows()
        if done is None:
            entry.warn_miss()
            fresh, cached = orders[0], None
        else:
            have = pc.is_in(ids, value_set=done[schema.PAIR_ID]).to_numpy(zero_copy_only=False)
            fresh = orders[0][~have]
            cached = blocks(in_order(done, ids.filter(pa.array(have))), self.per_block)
        first = self._source(table, rows, fresh)
        for role in group:
            first = self._through(first, role, split, len(fresh))
        first = self._on_driver_node(first, PartWriter, entry)
        if cached is not None:
            first = cached.union(first)
        self.to_seal.append((entry, table.num_rows))
        return [first, *(self._read_back(table, order, entry) for order in orders[1:])]

    def _read_back(self, table: pa.Table, order: np.ndarray, entry: ScoreCache):
        ids = table.select([schema.PAIR_ID]).take(pa.array(order))
        return self._on_driver_node(blocks(ids, self.per_block), CachedRows, entry)

    def _on_driver_node(self, ds, actor: type, entry: ScoreCache):
        """``ds`` through one ``actor`` on the driver's node, at the entry's parts: one light
        process, on any cluster (its head may offer no CPUs)."""
        return ds.map_batches(
            actor,
            fn_constructor_kwargs={"directory": str(entry.partial)},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=0,
            label_selector=self.driver_node,
            udf_modifying_row_count=False,
        )

    def _cache_stages(self, table: pa.Table, split: str):
        """The run's pools in groups of one cache, ``(cache, roles, entry)``: those scored before
        training first, then ``auto``, then ``none``; an entry is keyed on every pool scored up
        to it (it holds all their columns)."""
        cfg = self.cfg

        def cache_of(role: pools.Role) -> str:
            cache = role.pool.cache
            return cache if cache in ("none", "memory", AUTO) else str(resolve_path(cache))

        def rank(role: pools.Role) -> int:
            return {AUTO: 1, "none": 2}.get(role.pool.cache, 0)

        ordered = sorted(pools.roles(cfg, self.paths), key=rank)
        stages, scored = [], []
        for cache, group in itertools.groupby(ordered, key=cache_of):
            group = list(group)
            scored += group
            entry = None
            if cache not in ("none", "memory"):
                parts = fingerprint(cfg, self.paths, table, scored)
                entry = ScoreCache(auto_root(cfg) if cache == AUTO else Path(cache), split, parts)
            stages.append((cache, group, entry))
        return stages


def build_streams(cfg: TVKDConfig, paths: ModelPaths, data: PairData, board=None) -> Streams:
    """Plan the scored streams (and run now the pools whose cache keeps their results)."""
    planner = StreamPlanner(cfg, paths, board)
    epochs = epoch_orders(data.train.num_rows, cfg.train.epochs, cfg.run.seed)
    evals = None
    if data.eval is not None:
        (evals,) = planner.datasets(data.eval, "eval", [np.arange(data.eval.num_rows)])
    return Streams(
        train=planner.datasets(data.train, "train", epochs),
        eval=evals,
        num_train_pairs=data.train.num_rows,
        rows_per_block=planner.per_block,
        data_report=data.report,
        to_seal=planner.to_seal,
    )


def seal_caches(streams: Streams) -> None:
    """After training: the ``auto`` parts that now hold every pair become their entries. The
    cache only saves later work, so a failure here warns; the trained run stands."""
    for entry, num_pairs in streams.to_seal:
        try:
            entry.seal(num_pairs)
        except OSError as exc:
            logger.warning("could not seal the score cache %s: %s", entry.target, exc)
