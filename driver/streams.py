"""The scored streams (SPEC §3): pairs → tokenise → teacher pool → reference pool → Ray Train.

Everything before Ray Train is one lazy Ray Data plan, and only small Arrow columns (Φ per
response token, two log-probs per pair) flow on to the trainers. Each pool's ``cache`` decides
whether its work is redone every epoch (``none``), kept in the object store (``memory``) or
written to Parquet under a fingerprint (a directory); pools that cache come first in the plan, so
a pool that streams every epoch never makes a cached one run again.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data

from driver import pools
from driver.cache import ScoreCache, blocks, fingerprint
from driver.inputs import ModelPaths, PairData
from tvkd_ray import schema
from tvkd_ray.config import TVKDConfig, resolve_path
from tvkd_ray.data import tokenize_dataset


@dataclass
class Streams:
    """The datasets handed to Ray Train and what the driver learnt building them."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    num_train_pairs: int
    rows_per_block: int
    data_report: dict[str, Any] = field(default_factory=dict)


def rows_per_block(cfg: TVKDConfig) -> int:
    """Pairs per Ray Data block: the largest batch of the pools that run (the unit they stream),
    or the trainers' batch in a run without pools."""
    return max((p.batch_size for p in cfg.pools().values()), default=cfg.train.batch_size)


def scored_stream(
    cfg: TVKDConfig, paths: ModelPaths, table: pa.Table, split: str
) -> ray.data.Dataset:
    """``table``'s pairs tokenised and scored by every pool of the run, cached as configured."""
    per_block = rows_per_block(cfg)
    ds = tokenize_dataset(
        blocks(table, per_block),
        paths.tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        batch_size=per_block,
        num_cpus=pools.TOKENIZE_CPUS,
        max_actors=1,
    )
    stages = _cache_stages(cfg, paths, table, split, per_block)
    pair_ids = table[schema.PAIR_ID]
    # The last entry that exists holds every column scored before it: start there, so that no
    # pool before it runs at all.
    hits = [i for i, (_, _, entry) in enumerate(stages) if entry is not None and entry.exists]
    if hits:
        ds = stages[hits[-1]][2].read(pair_ids)
        stages = stages[hits[-1] + 1 :]
    for cache, group, entry in stages:
        for role in group:
            ds = pools.through_pool(ds, role)
        if cache == "memory":
            ds = ds.materialize()
        elif entry is not None:
            entry.write(ds)
            ds = entry.read(pair_ids)
    return ds


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
            entry = ScoreCache(Path(cache), split, parts, per_block)
        stages.append((cache, group, entry))
    return stages


def build_streams(cfg: TVKDConfig, paths: ModelPaths, data: PairData) -> Streams:
    """Plan the scored streams (and run them now where a pool's cache materialises them)."""
    return Streams(
        train=scored_stream(cfg, paths, data.train, "train"),
        eval=None if data.eval is None else scored_stream(cfg, paths, data.eval, "eval"),
        num_train_pairs=data.train.num_rows,
        rows_per_block=rows_per_block(cfg),
        data_report=data.report,
    )
