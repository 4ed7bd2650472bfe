"""The Parquet cache of scored pairs (``<section>.cache: auto`` or a directory): entries keyed by
a fingerprint of everything the scores depend on, so reruns, other seeds and later epochs reuse
the teacher's and the reference's work; a miss says which part changed.

A directory's entry is written whole before training. ``auto`` writes the blocks of the first
epoch as they stream past (``PartWriter``) into the entry's partial folder; later epochs read
them back (``CachedRows``), and the driver seals the parts into the entry once they hold every
pair. A stopped run leaves its parts, and the next run with the same fingerprint scores only the
pairs they lack.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from driver.inputs import ModelPaths
from driver.pools import Role
from tvkd_ray import schema
from tvkd_ray.config import TVKDConfig

logger = logging.getLogger(__name__)
FINGERPRINT_FILE = "_fingerprint.json"
PARTS = "part-*.parquet"


def model_id(path: str | None) -> str:
    """A model directory by content, not modification time: every run rebuilds its
    student_init (the default reference), and the cache must survive that."""
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


def fingerprint(cfg: TVKDConfig, paths: ModelPaths, table: pa.Table, scored: list[Role]) -> dict:
    """What the scored columns depend on, each part hashed on its own so that a miss can say
    which part changed: the pairs, the tokenizers and lengths, and each role's spec."""
    # By the set of pairs, not their order: run.seed reshuffles the same pairs, and seeds of one
    # experiment must share the teacher's work.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.sort_by(schema.PAIR_ID))
    parts = {
        "data": hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16],
        "tokenizer": model_id(paths.tokenizer),
        "lengths": f"{cfg.data.max_length}/{cfg.data.max_prompt_length}",
    }
    if paths.cross_tokenizer:  # the teacher's own tokenizer shapes the rows of every pool
        parts["teacher_tokenizer"] = model_id(paths.teacher)
    for role in scored:
        fields = role.spec.output_fields()
        fields.update({k: model_id(fields[k]) for k in role.spec.MODELS})
        parts[role.name] = json.dumps(fields, sort_keys=True)
    return parts


@dataclass
class ScoreCache:
    """The entry ``<root>/<split>-<key>`` of one stream."""

    root: Path
    split: str
    parts: dict[str, str]

    @property
    def target(self) -> Path:
        key = hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:20]
        return self.root / f"{self.split}-{key}"

    @property
    def exists(self) -> bool:
        return (self.target / FINGERPRINT_FILE).exists()

    @property
    def partial(self) -> Path:
        """Where ``auto`` writes the blocks as they stream past, until the entry is sealed."""
        return self.root / f".{self.target.name}.partial"

    def partial_rows(self) -> pa.Table | None:
        """The pairs scored so far by an unsealed ``auto`` entry (None: none yet)."""
        return read_parts(self.partial)

    def seal(self, num_pairs: int) -> bool:
        """Make the parts the entry once they hold all ``num_pairs`` pairs; True if it exists."""
        if self.exists:
            return True
        rows = self.partial_rows()
        if rows is None or rows.num_rows < num_pairs:
            return False
        tmp = self.root / f".{self.target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        pq.write_table(rows, tmp / "data" / "part-0.parquet")
        self._commit(tmp)
        shutil.rmtree(self.partial, ignore_errors=True)
        return True

    def write(self, scored: ray.data.Dataset) -> None:
        """Run ``scored`` and write it as this entry (atomically: a stopped write leaves none)."""
        self.warn_miss()
        tmp = self.root / f".{self.target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        scored.write_parquet(str(tmp / "data"))
        self._commit(tmp)

    def _commit(self, tmp: Path) -> None:
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(self.parts, indent=1))
        shutil.rmtree(self.target, ignore_errors=True)
        tmp.rename(self.target)

    def read_rows(self) -> pa.Table:
        """The entry's rows. The driver already holds these pairs' text; their scored rows are
        of the same order of size, and reading them here is faster than a Ray Data read."""
        logger.info("score cache: reading %s", self.target)
        return pq.read_table(self.target / "data")

    def warn_miss(self) -> None:
        entries = self.root.glob(f"{self.split}-*/{FINGERPRINT_FILE}")
        previous = sorted(entries, key=lambda p: p.stat().st_mtime)
        if previous:
            old = json.loads(previous[-1].read_text())
            changed = sorted(k for k in self.parts if old.get(k) != self.parts[k])
            logger.warning(
                "score cache miss for %s: %s changed since %s; recomputing",
                self.split,
                ", ".join(changed) or "format",
                previous[-1].parent.name,
            )


def in_order(rows: pa.Table, pair_ids: pa.ChunkedArray | pa.Array) -> pa.Table:
    """``rows`` (scored pairs) in the order of ``pair_ids``."""
    return rows.take(pc.index_in(pair_ids, value_set=rows[schema.PAIR_ID]))


def read_parts(directory: Path) -> pa.Table | None:
    """Every part under ``directory``, each pair once (a retried block writes its pairs again)."""
    files = sorted(directory.glob(PARTS))
    if not files:
        return None
    rows = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    ids = rows[schema.PAIR_ID].to_numpy()
    _, first = np.unique(ids, return_index=True)
    return rows.take(pa.array(np.sort(first)))


class PartWriter:
    """Ray Data callable class of ``auto``: writes each block as one part under ``directory``
    and passes it on unchanged. Parts are named by their pairs, so a retried block replaces its
    own part; the rename makes a part appear whole or not at all."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, block: pa.Table) -> pa.Table:
        digest = hashlib.sha256(block[schema.PAIR_ID].to_numpy().tobytes()).hexdigest()[:20]
        path = self.directory / f"part-{digest}.parquet"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        pq.write_table(block, tmp)
        os.replace(tmp, path)
        return block


class CachedRows:
    """Ray Data callable class: each block's pairs (a ``pair_id`` column) as scored in the parts
    under ``directory``. It reads them at its first block, when the epoch that wrote them has
    ended: an epoch's dataset starts only once every worker is done with the one before."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.rows: pa.Table | None = None

    def __call__(self, block: pa.Table) -> pa.Table:
        if self.rows is None:
            self.rows = read_parts(self.directory)
        ids = block[schema.PAIR_ID]
        found = self.rows is not None and pc.all(pc.is_in(ids, self.rows[schema.PAIR_ID])).as_py()
        if not found:
            raise RuntimeError(f"score cache {self.directory} lacks pairs of this epoch")
        return in_order(self.rows, ids)


def blocks(table: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """A dataset of several blocks, so the actor pools stream and share the work."""
    slices = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    return ray.data.from_arrow(slices or [table])
