"""The scored streams (SPEC §3): pairs → tokenise → teacher pool → reference pool → Ray Train.

Everything before Ray Train is lazy Ray Data plans, and only small Arrow columns (Φ per response
token, two log-probs per pair) flow on to the trainers. Each training epoch is its own dataset, in
its own seeded order. Each pool's ``cache`` decides whether its work is redone every epoch
(``none``: it streams inside each epoch's plan), done once before training and kept (``memory``)
or written to Parquet under a fingerprint (a directory); pools that cache run first, so a pool
that streams every epoch never makes a cached one run again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from driver import pools
from driver.cache import ScoreCache, blocks, fingerprint, in_order
from driver.inputs import ModelPaths, PairData
from tvkd_ray import schema
from tvkd_ray.config import TVKDConfig, resolve_path
from tvkd_ray.data import tokenize_dataset


@dataclass
class Streams:
    """The datasets handed to Ray Train and what the driver learnt building them."""

    train: list[ray.data.Dataset]  # one per epoch, each in its own order
    eval: ray.data.Dataset | None
    num_train_pairs: int
    rows_per_block: int
    data_report: dict[str, Any] = field(default_factory=dict)


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


def scored_streams(
    cfg: TVKDConfig, paths: ModelPaths, table: pa.Table, split: str, orders: list[np.ndarray]
) -> list[ray.data.Dataset]:
    """``table``'s pairs tokenised and scored by every pool of the run, one dataset per row
    order: pools that cache run once, before any order is taken (their rows wait on the driver
    and in the object store); pools with ``cache: none`` stream within each dataset."""
    per_block = rows_per_block(cfg)
    stages = _cache_stages(cfg, paths, table, split, per_block)
    cached = [stage for stage in stages if stage[0] != "none"]
    streaming = [role for cache, group, _ in stages if cache == "none" for role in group]
    rows = _cached_rows(cfg, paths, table, cached, per_block)
    datasets = []
    for order in orders:
        if rows is None:
            ds = _tokenized(cfg, paths, table.take(pa.array(order)), per_block)
        else:
            ds = blocks(in_order(rows, table[schema.PAIR_ID].take(pa.array(order))), per_block)
        for role in streaming:
            ds = pools.through_pool(ds, role)
        datasets.append(ds)
    return datasets


def _tokenized(cfg: TVKDConfig, paths: ModelPaths, table: pa.Table, per_block: int):
    return tokenize_dataset(
        blocks(table, per_block),
        paths.tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        batch_size=per_block,
        num_cpus=pools.TOKENIZE_CPUS,
        max_actors=1,
    )


def _cached_rows(cfg, paths, table: pa.Table, stages, per_block: int) -> pa.Table | None:
    """The pairs scored by every caching pool (None without one). The last Parquet entry that
    exists holds every column scored before it: start there, so no pool before it runs."""
    rows = None
    hits = [i for i, (_, _, entry) in enumerate(stages) if entry is not None and entry.exists]
    if hits:
        rows = stages[hits[-1]][2].read_rows()
        stages = stages[hits[-1] + 1 :]
    for _, group, entry in stages:
        ds = _tokenized(cfg, paths, table, per_block) if rows is None else blocks(rows, per_block)
        for role in group:
            ds = pools.through_pool(ds, role)
        if entry is None:  # memory
            rows = pa.concat_tables(ray.get(ds.to_arrow_refs()))
        else:
            entry.write(ds)
            rows = entry.read_rows()
    return rows


def _cache_stages(cfg: TVKDConfig, paths: ModelPaths, table: pa.Table, split: str, per_block: int):
    """The run's pools in groups of one cache, ``(cache, roles, entry)``, cached groups first;
    a directory's entry is keyed on every pool scored up to it (it holds all their columns)."""

    def cache_of(role: pools.Role) -> str:
        cache = role.pool.cache
        return cache if cache in ("none", "memory") else str(resolve_path(cache))

    ordered = sorted(pools.roles(cfg, paths), key=lambda role: role.pool.cache == "none")
    stages, scored = [], []
    for cache, group in itertools.groupby(ordered, key=cache_of):
        group = list(group)
        scored += group
        entry = None
        if cache not in ("none", "memory"):
            parts = fingerprint(cfg, paths.tokenizer, table, scored)
            entry = ScoreCache(Path(cache), split, parts)
        stages.append((cache, group, entry))
    return stages


def build_streams(cfg: TVKDConfig, paths: ModelPaths, data: PairData) -> Streams:
    """Plan the scored streams (and run now the pools whose cache keeps their results)."""
    epochs = epoch_orders(data.train.num_rows, cfg.train.epochs, cfg.run.seed)
    evals = None
    if data.eval is not None:
        (evals,) = scored_streams(cfg, paths, data.eval, "eval", [np.arange(data.eval.num_rows)])
    return Streams(
        train=scored_streams(cfg, paths, data.train, "train", epochs),
        eval=evals,
        num_train_pairs=data.train.num_rows,
        rows_per_block=rows_per_block(cfg),
        data_report=data.report,
    )
