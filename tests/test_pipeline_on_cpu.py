"""The streaming pipeline on a real local Ray cluster: every pair once, right values, the teacher
cache, a teacher actor that dies mid-stream, and resource requests the cluster cannot meet."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from test_actors_on_cpu import (  # noqa: E402
    assert_lists_close,
    direct_columns,
    direct_soft_value,
    direct_token_logps,
)

from actors.progress import ProgressBoard  # noqa: E402
from driver import cache as score_cache  # noqa: E402
from driver import inputs, pools, streams  # noqa: E402
from tvkd_ray import schema  # noqa: E402
from tvkd_ray.config import load_config  # noqa: E402
from tvkd_ray.data import collate, load_pairs, tokenize_batch  # noqa: E402
from tvkd_ray.errors import ResourceError  # noqa: E402
from tvkd_ray.forward import ResponseLogps, row_sums  # noqa: E402
from tvkd_ray.models import load_model, load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NUM_PAIRS = 24  # three teacher batches of 8


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    lines = (REPO / "examples/data/bundled/train.jsonl").read_text().splitlines(keepends=True)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(lines[:NUM_PAIRS]))
    return path


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    """Shared by the module's configs, so the student's initial weights are built once."""
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture
def make_config(train_file, output_dir):
    def make(*overrides):
        return load_config(
            REPO / "examples/tiny.yaml",
            [
                f"run.output_dir={output_dir}",
                f"data.train_path={train_file}",
                "data.eval_path=null",
                "teacher.cache=none",
                "reference.cache=none",
                *overrides,
            ],
        )

    return make


def build_streams(cfg, paths, board=None) -> streams.Streams:
    """The pipeline as ``fit`` runs it: tokenizers and pairs checked first, then the plan."""
    data = inputs.load_data(cfg, inputs.check_tokenizers(cfg))
    return streams.build_streams(cfg, paths, data, board)


def consume(ds) -> pa.Table:
    """All rows of a dataset through ``iter_batches``, sorted by pair_id."""
    batches = list(ds.iter_batches(batch_size=8, batch_format="pyarrow"))
    return pa.concat_tables(batches).sort_by(schema.PAIR_ID)


def assert_every_pair_once_with_direct_values(rows: pa.Table, cfg, paths) -> None:
    """Exactly the file's pairs, each once, with the tokeniser's ids, and Φ and reference
    log-probs equal to the direct unpadded computation on the same models."""
    assert rows.column("pair_id").to_pylist() == list(range(NUM_PAIRS))
    pairs = load_pairs(cfg.data.train_path).table
    expected_ids = tokenize_batch(
        pairs,
        load_tokenizer(paths.tokenizer),
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
    )
    assert rows.select(expected_ids.column_names).equals(expected_ids)

    teacher = load_model(paths.teacher).eval()
    soft_value_settings = {
        "tau": cfg.loss.tau,
        "q_scale": cfg.loss.q_scale,
        "normalize": cfg.loss.potential_normalize,
        "top_k": cfg.teacher.top_k if cfg.loss.sums_top_k else 0,
    }
    potentials = direct_columns(
        rows, lambda p, r: direct_soft_value(teacher, p, r, **soft_value_settings)
    )
    reference = load_model(paths.reference).eval()
    ref_logps = direct_columns(rows, lambda p, r: direct_token_logps(reference, p, r).sum())
    sides = zip(("chosen", "rejected"), schema.POTENTIALS, schema.REF_LOGPS, strict=True)
    for side, potentials_column, ref_column in sides:
        assert_lists_close(rows.column(potentials_column), potentials[side])
        got = torch.tensor(rows.column(ref_column).to_pylist())
        torch.testing.assert_close(got, torch.stack(ref_logps[side]), rtol=1e-5, atol=1e-5)


def test_stream_delivers_every_pair_once_with_direct_values(ray_cluster, make_config):
    cfg = make_config()
    paths = inputs.prepare_models(cfg, inputs.check_tokenizers(cfg))
    streams = build_streams(cfg, paths)
    assert streams.eval is None and streams.num_train_pairs == NUM_PAIRS
    (train,) = streams.train  # one dataset per epoch
    rows = consume(train)
    assert_every_pair_once_with_direct_values(rows, cfg, paths)
    # Streamed, not cached: the executed plan ran both model pools.
    stats = train.stats()
    assert "TeacherPotentials" in stats and "ReferenceLogps" in stats
    assert_student_matches_reference(rows, paths)


def assert_student_matches_reference(rows: pa.Table, paths) -> None:
    """At step 0 the student is the reference: its log-probs, in micro-batches of another size
    (other padding) than the reference pool's, equal the streamed ones up to float summation
    order (same device type, same numerics). On some CPUs (AVX-512 GEMM kernels blocked by batch
    size) the last bits differ with the padding: 4e-6 on a sum of -62.9 was seen."""
    policy = ResponseLogps(load_model(paths.student_init))
    pad_id = load_tokenizer(paths.student_init).pad_token_id
    for start in range(0, rows.num_rows, 3):
        table = rows.slice(start, 3)
        batch = collate(table, pad_id)
        with torch.no_grad():
            logps, _ = policy(batch.input_ids, batch.attention_mask, batch.response_mask)
        sides = batch.sides(row_sums(logps, batch.response_mask))
        for got, column in zip((sides.chosen, sides.rejected), schema.REF_LOGPS, strict=True):
            want = torch.tensor(table.column(column).to_pylist())
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_teacher_cache_reuses_matching_parquet_and_recomputes_on_change(
    ray_cluster, make_config, tmp_path, monkeypatch, caplog
):
    cache = tmp_path / "teacher-cache"
    in_cache = [f"teacher.cache={cache}", f"reference.cache={cache}"]  # one entry for both
    cfg = make_config(*in_cache)
    paths = inputs.prepare_models(cfg, inputs.check_tokenizers(cfg))
    # Counts the teacher pools planned: the only place their actors come from.
    plans = []
    through_pool = pools.through_pool

    def counted(ds, role, *progress):
        plans.extend([role] if role.name == "teacher" else [])
        return through_pool(ds, role, *progress)

    monkeypatch.setattr(pools, "through_pool", counted)

    build_streams(cfg, paths)  # a miss computes and writes the entry right here
    assert len(plans) == 1
    (entry,) = cache.glob("train-*")
    assert (entry / "_fingerprint.json").is_file() and list(entry.glob("data/*.parquet"))
    # Cache entries are read straight from Parquet; only the reuse below goes through Ray, as
    # each Ray read costs start-up time here.
    first = pq.read_table(entry / "data").sort_by(schema.PAIR_ID)
    assert_every_pair_once_with_direct_values(first, cfg, paths)

    (again,) = build_streams(cfg, paths).train
    second = consume(again)
    assert len(plans) == 1, "a matching cache entry must not run the teacher again"
    assert "TeacherPotentials" not in again.stats()
    assert second.equals(first)

    # Another seed reshuffles the same pairs: it shares the entry, in its own order, and each
    # epoch has an order of its own, the same whenever the run is planned again (a resume).
    reseeded = make_config(*in_cache, "run.seed=7", "train.epochs=2")
    data = inputs.load_data(reseeded, inputs.check_tokenizers(reseeded))
    epochs = streams.build_streams(reseeded, paths, data).train
    assert len(plans) == 1 and list(cache.glob("train-*")) == [entry]
    orders = streams.epoch_orders(NUM_PAIRS, 2, seed=7)
    assert not np.array_equal(orders[0], orders[1])
    for order, stream in zip(orders, epochs, strict=True):
        arrived = pa.concat_tables(stream.iter_batches(batch_size=8, batch_format="pyarrow"))
        expected = data.train[schema.PAIR_ID].take(pa.array(order))
        assert arrived[schema.PAIR_ID].to_pylist() == expected.to_pylist()
        assert arrived.sort_by(schema.PAIR_ID).equals(first)
    assert np.array_equal(streams.epoch_orders(NUM_PAIRS, 2, seed=7)[1], orders[1])

    changed = make_config(*in_cache, "loss.tau=2.0")
    with caplog.at_level(logging.INFO, logger=score_cache.logger.name):
        build_streams(changed, paths)
    assert len(plans) == 2
    entries = set(cache.glob("train-*"))
    assert entry in entries and len(entries) == 2, "a changed setting needs its own entry"
    misses = [r.getMessage() for r in caplog.records if "score cache miss" in r.getMessage()]
    assert len(misses) == 1 and "teacher changed" in misses[0], caplog.text
    (new_entry,) = entries - {entry}
    third = pq.read_table(new_entry / "data").sort_by(schema.PAIR_ID)
    assert_every_pair_once_with_direct_values(third, changed, paths)
    assert not third.column(schema.CHOSEN_POTENTIALS).equals(first.column(schema.CHOSEN_POTENTIALS))


def test_each_pool_keeps_its_own_cache(ray_cluster, make_config, tmp_path, monkeypatch):
    """A Parquet cache for the reference, none for the teacher: the reference scores once into
    its entry (no teacher columns there), the teacher streams on top of the cached rows, and a
    second build reads the entry and plans the teacher alone."""
    cache = tmp_path / "reference-cache"
    cfg = make_config(f"reference.cache={cache}")  # teacher.cache stays none
    paths = inputs.prepare_models(cfg, inputs.check_tokenizers(cfg))
    planned = []
    through_pool = pools.through_pool

    def counted(ds, role, *progress):
        planned.append(role.name)
        return through_pool(ds, role, *progress)

    monkeypatch.setattr(pools, "through_pool", counted)
    build_streams(cfg, paths)
    (entry,) = cache.glob("train-*")
    stored = pq.read_table(entry / "data").column_names
    assert schema.REF_CHOSEN_LOGPS in stored and schema.CHOSEN_POTENTIALS not in stored
    assert planned == ["reference", "teacher"]  # the cached pool first
    planned.clear()
    again = build_streams(cfg, paths)
    assert planned == ["teacher"]
    assert_every_pair_once_with_direct_values(consume(again.train[0]), cfg, paths)


def test_auto_cache_streams_the_first_epoch_and_keeps_it(ray_cluster, make_config, tmp_path):
    """``auto``: the first epoch streams through both pools and writes each block as it passes;
    the second epoch reads those parts back (no pool), in its own order; sealed after training,
    the entry serves a rerun without any pool; a rerun after a stop scores only the pairs its
    parts lack."""
    auto = ["teacher.cache=auto", "reference.cache=auto", "train.epochs=2"]
    cfg = make_config(*auto, f"run.output_dir={tmp_path}")
    paths = inputs.prepare_models(cfg, inputs.check_tokenizers(cfg))
    board = ProgressBoard.remote()
    data = inputs.load_data(cfg, inputs.check_tokenizers(cfg))
    planned = streams.build_streams(cfg, paths, data, board)
    first, second = (ordered(ds) for ds in planned.train)  # as Ray Train reads them
    ((entry, num_pairs),) = planned.to_seal
    assert num_pairs == NUM_PAIRS and not entry.exists and entry.root == tmp_path / "score-cache"
    orders = [
        data.train[schema.PAIR_ID].take(pa.array(order)).to_pylist()
        for order in streams.epoch_orders(NUM_PAIRS, 2, seed=cfg.run.seed)
    ]
    arrived = pa.concat_tables(first.iter_batches(batch_size=8, batch_format="pyarrow"))
    assert arrived[schema.PAIR_ID].to_pylist() == orders[0]
    assert "TeacherPotentials" in first.stats() and len(list(entry.partial.glob("part-*"))) == 3
    rows = arrived.sort_by(schema.PAIR_ID)
    assert_every_pair_once_with_direct_values(rows, cfg, paths)
    read_back = pa.concat_tables(second.iter_batches(batch_size=8, batch_format="pyarrow"))
    assert read_back[schema.PAIR_ID].to_pylist() == orders[1]
    assert "TeacherPotentials" not in second.stats()
    assert read_back.sort_by(schema.PAIR_ID).equals(rows)
    _, stages = ray.get(board.snapshot.remote())
    assert {k: (v.done, v.total) for k, v in stages.items()} == {
        "teacher train": (NUM_PAIRS, NUM_PAIRS),
        "reference train": (NUM_PAIRS, NUM_PAIRS),
    }

    streams.seal_caches(planned)
    assert entry.exists and not entry.partial.exists()
    rerun = build_streams(cfg, paths)
    assert rerun.to_seal == []
    assert (
        consume(rerun.train[0]).equals(rows) and "TeacherPotentials" not in rerun.train[0].stats()
    )

    # A stop after two blocks: the next run scores the third block only, its first epoch
    # brings the pairs already written first, and its parts then make the whole entry again.
    shutil.rmtree(entry.target)
    writer = score_cache.PartWriter(str(entry.partial))
    for start in (0, 8):
        writer(rows.slice(start, 8))
    board = ProgressBoard.remote()
    resumed = build_streams(cfg, paths, board)
    assert scores(consume(resumed.train[0])).equals(scores(rows))
    _, stages = ray.get(board.snapshot.remote())
    assert stages["teacher train"].total == stages["teacher train"].done == 8
    streams.seal_caches(resumed)
    assert entry.exists and scores(entry.read_rows()).equals(scores(rows))


def ordered(ds):
    """``ds`` delivering its blocks in order, as the trainers' split of it does."""
    ds = ds.copy(ds)
    ds.context.execution_options.preserve_order = True
    return ds


def scores(rows: pa.Table) -> pa.Table:
    """The scored columns by pair, without the actors' timings (those differ run to run)."""
    return rows.drop_columns([schema.TEACHER_S, schema.REFERENCE_S]).sort_by(schema.PAIR_ID)


@pytest.mark.faults
def test_dead_teacher_actor_is_restarted_and_every_pair_arrives_once(
    ray_cluster, make_config, arm_fault
):
    cfg = make_config()
    assert cfg.teacher.max_restarts >= 1 and NUM_PAIRS > 2 * cfg.teacher.batch_size
    paths = inputs.prepare_models(cfg, inputs.check_tokenizers(cfg))
    marker = arm_fault("teacher", 2)  # exits (os._exit) on its 2nd batch, once
    rows = consume(build_streams(cfg, paths).train[0])
    assert marker.exists(), "the teacher actor never crashed"
    assert "teacher pid" in marker.read_text()
    assert_every_pair_once_with_direct_values(rows, cfg, paths)


def test_unsatisfiable_gpu_request_names_the_teacher_pool(ray_cluster, make_config):
    assert ray_cluster.cluster_resources().get("GPU", 0) == 0
    cfg = make_config("teacher.num_gpus_per_actor=1")
    started = time.monotonic()
    with pytest.raises(ResourceError) as error:
        pools.check_resources(cfg)
    assert time.monotonic() - started < 60
    assert "teacher pool" in str(error.value) and "GPU" in str(error.value)
