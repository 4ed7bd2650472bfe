"""The streaming pipeline (SPEC §3): read → tokenise → teacher pool → reference pool → Ray Train.

Everything before Ray Train is one lazy Ray Data plan: the teacher and reference run as actor
pools (``map_batches(..., compute=ActorPoolStrategy(size=n))``) with the resources the config
gives them, and only small Arrow columns (Φ per response token, two log-probs per pair) flow on to
the trainers. ``teacher.cache`` decides whether the teacher/reference work is redone every epoch
(``none``), kept in the object store (``memory``) or written to Parquet under a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train

from actors.reference import ReferenceLogps
from actors.teacher import TeacherPotentials
from tvkd_ray.api import ACTOR_ALLOCATOR_ENV
from tvkd_ray.config import TVKDConfig, resolve_path
from tvkd_ray.data import load_pairs, tokenize_dataset
from tvkd_ray.errors import ResourceError
from tvkd_ray.models import (
    build_student,
    check_tokenizers_compatible,
    load_tokenizer,
    resolve_model,
)

logger = logging.getLogger(__name__)
TOKENIZE_CPUS = 0.5  # tokenising is light; a fractional share keeps it beside the model pools


@dataclass
class ModelPaths:
    """Local directories of every model the run uses (presets materialised, student built)."""

    student_init: str
    reference: str
    tokenizer: str
    teacher: str | None = None
    teacher_ref: str | None = None


@dataclass
class Streams:
    """The datasets handed to Ray Train and what the driver learnt building them."""

    train: ray.data.Dataset
    eval: ray.data.Dataset | None
    num_train_pairs: int
    num_eval_pairs: int
    rows_per_block: int
    data_report: dict[str, Any] = field(default_factory=dict)


def check_tokenizers(cfg: TVKDConfig):
    """Load the student's tokenizer and check every other model's matches it (SPEC §4), before
    any model work; returns the student's tokenizer."""
    student_name = cfg.student.tokenizer or cfg.student.model
    student_tok = load_tokenizer(student_name)
    others = {"reference": cfg.reference.model}
    if cfg.uses_teacher:
        others["teacher"] = cfg.teacher.model
        if cfg.loss.potential == "implicit_reward":
            others["teacher.ref_model"] = cfg.teacher.ref_model
    for role, name in others.items():
        if name is not None:
            check_tokenizers_compatible(
                load_tokenizer(name),
                student_tok,
                f"{role} tokenizer '{name}'",
                f"student tokenizer '{student_name}'",
            )
    return student_tok


def prepare_models(cfg: TVKDConfig) -> ModelPaths:
    """Resolve every model to a local directory and build the student's initial weights."""
    student_init = build_student(
        cfg.student.model,
        str(cfg.run_dir / "student_init"),
        num_layers=cfg.student.num_layers,
        init=cfg.student.init,
        seed=cfg.run.seed,
    )
    paths = ModelPaths(
        student_init=student_init,
        reference=resolve_model(cfg.reference.model) if cfg.reference.model else student_init,
        tokenizer=resolve_model(cfg.student.tokenizer) if cfg.student.tokenizer else student_init,
    )
    if cfg.uses_teacher:
        paths.teacher = resolve_model(cfg.teacher.model)
        if cfg.loss.potential == "implicit_reward":
            paths.teacher_ref = resolve_model(cfg.teacher.ref_model)
    return paths


def resource_demand(cfg: TVKDConfig) -> dict[str, dict[str, float]]:
    """CPUs and GPUs each pool asks for, by pool name."""
    demand = {
        "train workers": {
            "CPU": cfg.train.num_workers * cfg.train.num_cpus_per_worker,
            "GPU": float(cfg.train.num_workers if cfg.train.use_gpu else 0),
        },
        "tokenizer pool": {"CPU": TOKENIZE_CPUS, "GPU": 0.0},
    }
    if cfg.run.stage != "sft":
        r = cfg.reference
        demand["reference pool"] = {
            "CPU": r.num_actors * r.num_cpus_per_actor,
            "GPU": r.num_actors * r.num_gpus_per_actor,
        }
    if cfg.uses_teacher:
        t = cfg.teacher
        demand["teacher pool"] = {
            "CPU": t.num_actors * t.num_cpus_per_actor,
            "GPU": t.num_actors * t.num_gpus_per_actor,
        }
    return demand


def check_resources(cfg: TVKDConfig) -> None:
    """Fail in seconds, naming the pool, when the cluster cannot hold every pool at once (a
    request Ray cannot satisfy would otherwise wait forever)."""
    available = ray.cluster_resources()
    demand = resource_demand(cfg)
    for kind in ("GPU", "CPU"):
        total = sum(d[kind] for d in demand.values())
        have = float(available.get(kind, 0.0))
        if total > have + 1e-9:
            parts = ", ".join(f"{name} {d[kind]:g}" for name, d in demand.items() if d[kind] > 0)
            raise ResourceError(
                f"the cluster has {have:g} {kind}s but the run needs {total:g} ({parts}); "
                f"lower the per-pool {kind} settings or add nodes"
            )


class ExactlyOnceDataConfig(ray.train.DataConfig):
    """Split each dataset across the train workers without equalising the shards: Ray Train's
    default (``equal=True``) drops up to ``num_workers - 1`` rows per epoch, and every pair must
    be trained exactly once. The train loop copes with uneven shards."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        splits = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            # Same order every run, so a resumed run and an uninterrupted one see equal batches.
            ds.context.execution_options.preserve_order = True
            parts = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, part in enumerate(parts):
                splits[rank][name] = part
        return splits


def _source_table(cfg: TVKDConfig, source, tokenizer) -> tuple[pa.Table, dict[str, Any]]:
    loaded = load_pairs(
        source, format=cfg.data.format, tokenizer=tokenizer, on_invalid=cfg.data.on_invalid
    )
    report = {"source": loaded.source, "format": loaded.format, "pairs": loaded.table.num_rows}
    report.update({f"skipped/{reason}": n for reason, n in loaded.skipped.items()})
    return loaded.table, report


def _blocks(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """A dataset of several blocks, so the actor pools stream and share the work."""
    slices = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(slices or [table])


def rows_per_block(cfg: TVKDConfig) -> int:
    """Pairs per Ray Data block: one teacher (or reference) batch, the unit the pools stream."""
    return max(cfg.teacher.batch_size, cfg.reference.batch_size)


def _fingerprint_parts(cfg: TVKDConfig, paths: ModelPaths, table: pa.Table) -> dict[str, str]:
    """What the cached teacher/reference columns depend on, each part hashed on its own so a
    mismatch can say which part changed."""

    def model_id(path: str | None) -> str:
        # By content, not modification time: every run rebuilds its student_init (the default
        # reference), and the cache must survive that.
        if path is None:
            return "none"
        h = hashlib.sha256()
        for f in sorted(Path(path).glob("*")):
            if f.suffix in (".json", ".safetensors", ".txt", ".model", ".jinja"):
                h.update(f.name.encode())
                with open(f, "rb") as fh:
                    while chunk := fh.read(16 * 2**20):
                        h.update(chunk)
        return h.hexdigest()[:16]

    # By the set of pairs, not their order: run.seed reshuffles the same pairs, and seeds of one
    # experiment must share the teacher's work.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.sort_by("pair_id"))
    loss = cfg.loss
    return {
        "data": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16],
        "tokenizer": model_id(paths.tokenizer),
        "teacher": model_id(paths.teacher),
        "teacher_ref": model_id(paths.teacher_ref),
        "reference": model_id(paths.reference) if cfg.run.stage != "sft" else "none",
        "potential": json.dumps(
            [
                loss.potential,
                loss.tau,
                loss.q_scale,
                loss.potential_normalize,
                cfg.teacher.beta,
                cfg.teacher.top_k if loss.kd_weight > 0 else 0,
                cfg.uses_teacher,
            ]
        ),
        "lengths": f"{cfg.data.max_length}/{cfg.data.max_prompt_length}",
    }


def _cached(
    cfg: TVKDConfig, split: str, parts: dict[str, str], table: pa.Table, build
) -> ray.data.Dataset:
    """Reuse ``<cache>/<split>-<fingerprint>`` when present, else build and write it; either way
    the scored rows come back in ``table``'s order (this run's shuffle)."""
    root = resolve_path(cfg.teacher.cache)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]
    target = root / f"{split}-{key}"
    if (target / "_fingerprint.json").exists():
        logger.info("teacher cache hit: %s", target)
        return _in_order(cfg, pq.read_table(target / "data"), table["pair_id"])
    previous = sorted(root.glob(f"{split}-*/_fingerprint.json"), key=lambda p: p.stat().st_mtime)
    if previous:
        old = json.loads(previous[-1].read_text())
        changed = sorted(k for k in parts if old.get(k) != parts[k])
        logger.warning(
            "teacher cache miss for %s: %s changed since %s; recomputing",
            split,
            ", ".join(changed) or "format",
            previous[-1].parent.name,
        )
    tmp = root / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build().write_parquet(str(tmp / "data"))
    (tmp / "_fingerprint.json").write_text(json.dumps(parts, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return _in_order(cfg, pq.read_table(target / "data"), table["pair_id"])


def _in_order(cfg: TVKDConfig, scored: pa.Table, pair_ids: pa.ChunkedArray) -> ray.data.Dataset:
    """``scored`` rows in the order of ``pair_ids``. The driver already holds these pairs' text;
    their scored rows are of the same order of size, and reading them here is faster than
    starting a Ray Data read."""
    index = pc.index_in(pair_ids, value_set=scored["pair_id"])
    return _blocks(scored.take(index), rows_per_block(cfg))


def _actor_pool(cfg: TVKDConfig, ds, actor_class, args: dict, pool) -> ray.data.Dataset:
    """``ds`` through a fixed-size pool of ``actor_class`` with the pool's resources; dead actors
    are restarted (``teacher.max_restarts``) and their batches retried."""
    return ds.map_batches(
        actor_class,
        fn_constructor_kwargs={
            **args,
            "num_gpus": pool.num_gpus_per_actor,
            "num_threads": max(1, int(pool.num_cpus_per_actor)),
            "idle_priority": True,  # on CPU, the trainers come first
            "trust_remote_code": cfg.student.trust_remote_code,
        },
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
        num_cpus=pool.num_cpus_per_actor,
        num_gpus=pool.num_gpus_per_actor,
        runtime_env={"env_vars": ACTOR_ALLOCATOR_ENV},  # merged into the job's env_vars
        max_restarts=cfg.teacher.max_restarts,
        max_task_retries=-1,
        udf_modifying_row_count=False,
    )


def _scored(cfg: TVKDConfig, paths: ModelPaths, table: pa.Table) -> ray.data.Dataset:
    """The lazy plan: tokenise, then teacher potentials, then reference log-probs."""
    ds = tokenize_dataset(
        _blocks(table, rows_per_block(cfg)),
        paths.tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        batch_size=rows_per_block(cfg),
        num_cpus=TOKENIZE_CPUS,
        max_actors=1,
    )
    if cfg.uses_teacher:
        t = cfg.teacher
        teacher_args = {
            "model": paths.teacher,
            "potential": cfg.loss.potential,
            "tau": cfg.loss.tau,
            "q_scale": cfg.loss.q_scale,
            "normalize": cfg.loss.potential_normalize,
            "ref_model": paths.teacher_ref,
            "beta": t.beta,
            "top_k": t.top_k if cfg.loss.kd_weight > 0 else 0,
            "dtype": t.dtype,
        }
        ds = _actor_pool(cfg, ds, TeacherPotentials, teacher_args, t)
    if cfg.run.stage != "sft":
        reference_args = {"model": paths.reference, "dtype": cfg.student.dtype}
        ds = _actor_pool(cfg, ds, ReferenceLogps, reference_args, cfg.reference)
    return ds


def _stream(cfg: TVKDConfig, paths: ModelPaths, table: pa.Table, split: str) -> ray.data.Dataset:
    cache = cfg.teacher.cache
    if cache == "none":
        return _scored(cfg, paths, table)
    if cache == "memory":
        return _scored(cfg, paths, table).materialize()
    parts = _fingerprint_parts(cfg, paths, table)
    return _cached(cfg, split, parts, table, lambda: _scored(cfg, paths, table))


@dataclass
class PairData:
    """Validated, shuffled pair tables, ready to be tokenised and scored."""

    train: pa.Table
    eval: pa.Table | None
    report: dict[str, Any]


def load_data(cfg: TVKDConfig, tokenizer, train_dataset=None, eval_dataset=None) -> PairData:
    """Read and validate every pair (SPEC §4) before any model or Ray work; a bad row stops the
    run here, naming its file, row and field."""
    train_source = train_dataset if train_dataset is not None else cfg.data.train_path
    if train_source is None:
        from tvkd_ray.errors import ConfigError

        raise ConfigError("data.train_path: no training data (set it or pass train_dataset)")
    train, report = _source_table(cfg, train_source, tokenizer)
    eval_table = None
    eval_source = eval_dataset if eval_dataset is not None else cfg.data.eval_path
    if eval_source is not None:
        eval_table, eval_report = _source_table(cfg, eval_source, tokenizer)
        report.update({f"eval_{k}": v for k, v in eval_report.items()})
        _check_same_format(report, eval_report)
    # A fixed shuffle (run.seed) so resumed and repeated runs see the same order.
    train = train.take(pa.array(_permutation(train.num_rows, cfg.run.seed)))
    if eval_table is None and cfg.data.eval_fraction > 0:
        n_eval = max(1, int(round(train.num_rows * cfg.data.eval_fraction)))
        eval_table, train = train.slice(0, n_eval), train.slice(n_eval)
    return PairData(train=train, eval=eval_table, report=report)


def build_streams(cfg: TVKDConfig, paths: ModelPaths, data: PairData) -> Streams:
    """Plan the scored streams (and run them now when ``teacher.cache`` materialises them)."""
    return Streams(
        train=_stream(cfg, paths, data.train, "train"),
        eval=None if data.eval is None else _stream(cfg, paths, data.eval, "eval"),
        num_train_pairs=data.train.num_rows,
        num_eval_pairs=0 if data.eval is None else data.eval.num_rows,
        rows_per_block=rows_per_block(cfg),
        data_report=data.report,
    )


def _check_same_format(train_report: dict, eval_report: dict) -> None:
    from tvkd_ray.errors import DataError

    if train_report["format"] != eval_report["format"]:
        raise DataError(
            f"{eval_report['source']}: eval data is in {eval_report['format']} format but the "
            f"training data ({train_report['source']}) is {train_report['format']}; "
            "use one format (or set data.format explicitly)"
        )


def _permutation(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).permutation(n)
