"""Teacher and reference actors on CPU, against a direct unpadded single-process computation.

The direct computation runs the full model (``model(ids).logits``) on one sequence at a time, so
it shares no batching, padding, chunking or response-only LM-head code with the actors. The
actors' batches are right-padded (pairs of different lengths); "padding invariance" here means a
pair's outputs do not depend on what else is in its batch.
"""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from actors.inference import FrozenModelSpec  # noqa: E402
from actors.reference import ReferenceLogps  # noqa: E402
from actors.teacher import TeacherPotentials, TeacherSpec  # noqa: E402
from tvkd_ray import schema  # noqa: E402
from tvkd_ray.data import tokenize_batch  # noqa: E402
from tvkd_ray.models import build_student, load_model, load_tokenizer, resolve_model  # noqa: E402
from tvkd_ray.potentials import soft_value  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
# Prompts and responses of different lengths, so every batch is right-padded.
PAIRS = [
    ("How do I bake bread?", " Start with small steps.", " No."),
    (
        "\n\nHuman: Can you help me fix a bike?\n\nAssistant:",
        " Sure, here is how. The teacher explains the rules.",
        " I can't help with that.",
    ),
    ("Hi", " Yes!", " The cat likes some music and 42, 0.125 and 7%."),
]
LONG_PAIR = (
    "Why should I plant a tree? " * 6,
    " Our team finds clean water; a small robot writes about the answer. " * 4,
    " She wants the red car. " * 3,
)


def tokenized(pairs, first_id=0):
    """Tokenised pairs (schema.TOKENIZED) with the tiny tokenizer, ids from ``first_id``."""
    prompts, chosen, rejected = zip(*pairs)
    table = pa.table(
        {
            "pair_id": list(range(first_id, first_id + len(pairs))),
            "prompt": list(prompts),
            "chosen": list(chosen),
            "rejected": list(rejected),
        },
        schema=schema.PAIRS,
    )
    return tokenize_batch(table, load_tokenizer("tiny"), max_length=256, max_prompt_length=128)


# --- the direct computation (also used by tests/test_pipeline_on_cpu.py) ----------------------


@torch.no_grad()
def direct_logits(model, prompt_ids, response_ids) -> torch.Tensor:
    """Full-model float32 logits of the sequence alone at the positions predicting each response
    token (the position just before it): ``[len(response), V]``."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    start = len(prompt_ids) - 1
    return model(ids).logits[0, start : start + len(response_ids)].float()


def direct_token_logps(model, prompt_ids, response_ids) -> torch.Tensor:
    logits = direct_logits(model, prompt_ids, response_ids)
    targets = torch.tensor(list(response_ids))[:, None]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets).squeeze(-1)


def direct_soft_value(model, prompt_ids, response_ids, **kwargs) -> torch.Tensor:
    return soft_value(direct_logits(model, prompt_ids, response_ids), **kwargs)


def direct_implicit_reward(teacher, teacher_ref, prompt_ids, response_ids, beta) -> torch.Tensor:
    """β · Σ_{k<t} [log π_T − log π_Tref], written as an explicit exclusive running sum."""
    ratio = direct_token_logps(teacher, prompt_ids, response_ids) - direct_token_logps(
        teacher_ref, prompt_ids, response_ids
    )
    return beta * torch.cat([torch.zeros(1), ratio.cumsum(0)[:-1]])


def direct_columns(table: pa.Table, per_response) -> dict[str, list[torch.Tensor]]:
    """``per_response(prompt_ids, response_ids)`` for the chosen and rejected response of every
    row, keyed like the actors' output columns."""
    rows = table.to_pylist()
    return {
        side: [per_response(row["prompt_ids"], row[f"{side}_ids"]) for row in rows]
        for side in ("chosen", "rejected")
    }


def assert_lists_close(column: pa.ChunkedArray, expected: list[torch.Tensor]) -> None:
    got = column.to_pylist()
    assert [len(row) for row in got] == [len(row) for row in expected]
    for row, want in zip(got, expected):
        torch.testing.assert_close(torch.tensor(row, dtype=torch.float32), want.float(), **TOL)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_path():
    return resolve_model("tiny-teacher")


@pytest.fixture(scope="module")
def teacher_ref_path(tmp_path_factory):
    """The teacher's "pre-DPO" reference: same tokenizer, first two of its four layers."""
    out = tmp_path_factory.mktemp("teacher-ref") / "model"
    return build_student("tiny-teacher", str(out), num_layers=2, init="pretrained")


@pytest.fixture(scope="module")
def teacher_model(teacher_path):
    return load_model(teacher_path).eval()


@pytest.fixture(scope="module")
def table():
    return tokenized(PAIRS)


def test_pairs_are_right_padded_within_a_batch(table):
    lengths = [
        len(row["prompt_ids"]) + len(row[f"{side}_ids"])
        for side in ("chosen", "rejected")
        for row in table.to_pylist()
    ]
    prompt_lengths = {len(ids) for ids in table.column("prompt_ids").to_pylist()}
    assert len(set(lengths)) == len(lengths) and len(prompt_lengths) == len(PAIRS)


# --- teacher ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        # (normalize with q = τ would be 0 everywhere: logsumexp of a log_softmax.)
        {"normalize": True, "tau": 0.5},
        {"tau": 2.0, "q_scale": 0.5},
        {"normalize": True, "q_scale": 0.7},
    ],
)
def test_soft_value_potentials_equal_direct_unpadded_computation(
    settings, table, teacher_path, teacher_model
):
    out = TeacherPotentials(TeacherSpec(teacher_path, potential="soft_value", **settings))(table)
    expected = direct_columns(
        table, lambda p, r: direct_soft_value(teacher_model, p, r, **settings)
    )
    added = [schema.CHOSEN_POTENTIALS, schema.REJECTED_POTENTIALS, schema.TEACHER_S]
    assert out.column_names == [*table.column_names, *added]
    assert (out.column(schema.TEACHER_S).to_numpy() > 0).all()  # compute seconds per pair
    assert out.schema.field(schema.CHOSEN_POTENTIALS).type == pa.list_(pa.float32())
    assert out.select(table.column_names).equals(table)
    for side in ("chosen", "rejected"):
        assert_lists_close(out.column(f"{side}_potentials"), expected[side])


def test_bounded_soft_value_on_the_top_k_equals_direct_computation(
    table, teacher_path, teacher_model
):
    """loss.potential_support=top_k: the teacher sums over its top-k plus a rest bucket."""
    spec = TeacherSpec(teacher_path, normalize=True, q_scale=0.7, support_top_k=5)
    out = TeacherPotentials(spec)(table)
    settings = {"normalize": True, "q_scale": 0.7, "top_k": 5}
    expected = direct_columns(
        table, lambda p, r: direct_soft_value(teacher_model, p, r, **settings)
    )
    for side in ("chosen", "rejected"):
        assert_lists_close(out.column(f"{side}_potentials"), expected[side])


def test_implicit_reward_potentials_equal_direct_unpadded_computation(
    table, teacher_path, teacher_ref_path, teacher_model
):
    teacher_ref = load_model(teacher_ref_path).eval()
    actor = TeacherPotentials(
        TeacherSpec(teacher_path, potential="implicit_reward", ref_model=teacher_ref_path, beta=0.3)
    )
    out = actor(table)
    expected = direct_columns(
        table, lambda p, r: direct_implicit_reward(teacher_model, teacher_ref, p, r, beta=0.3)
    )
    for side in ("chosen", "rejected"):
        assert_lists_close(out.column(f"{side}_potentials"), expected[side])
        # Φ(s_1) = 0, and the teacher differs from its reference, so later values do not vanish.
        rows = out.column(f"{side}_potentials").to_pylist()
        assert all(row[0] == 0.0 for row in rows)
        assert any(abs(value) > 1e-3 for row in rows for value in row[1:])


def test_topk_equals_torch_topk_of_log_softmax(table, teacher_path, teacher_model):
    k = 32
    out = TeacherPotentials(TeacherSpec(teacher_path, top_k=k))(table)
    assert out.schema.field(schema.CHOSEN_TOPK_IDS).type == pa.list_(pa.int32())
    assert out.schema.field(schema.CHOSEN_TOPK_LOGPS).type == pa.list_(pa.float32())
    ids = out.column(schema.CHOSEN_TOPK_IDS).to_pylist()
    logps = out.column(schema.CHOSEN_TOPK_LOGPS).to_pylist()
    for row, row_ids, row_logps in zip(table.to_pylist(), ids, logps):
        logits = direct_logits(teacher_model, row["prompt_ids"], row["chosen_ids"])
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        assert torch.equal(torch.tensor(row_ids).view(-1, k), top.indices)
        torch.testing.assert_close(torch.tensor(row_logps).view(-1, k), top.values, **TOL)


# --- reference ----------------------------------------------------------------------------------


def test_reference_logps_equal_direct_unpadded_sums(table):
    path = resolve_model("tiny-student")
    model = load_model(path).eval()
    out = ReferenceLogps(FrozenModelSpec(path))(table)
    assert out.schema.field(schema.REF_CHOSEN_LOGPS).type == pa.float32()
    expected = direct_columns(table, lambda p, r: direct_token_logps(model, p, r).sum())
    for side, column in zip(("chosen", "rejected"), schema.REF_LOGPS, strict=True):
        got = torch.tensor(out.column(column).to_pylist())
        torch.testing.assert_close(got, torch.stack(expected[side]), **TOL)


# --- a pair's outputs do not depend on the rest of its batch --------------------------------------


def test_outputs_of_a_pair_do_not_depend_on_its_batch(teacher_path, teacher_ref_path):
    alone = tokenized(PAIRS[:1])
    # The other pair comes first and is much longer, so the pair is padded far to the right.
    batch = pa.concat_tables([tokenized([LONG_PAIR], first_id=1), alone])
    lengths = [len(ids) for ids in batch.column("chosen_ids").to_pylist()]
    assert lengths[0] > 4 * lengths[1]
    implicit = TeacherSpec(teacher_path, potential="implicit_reward", ref_model=teacher_ref_path)
    columns = {
        "soft_value": (
            TeacherPotentials(TeacherSpec(teacher_path, normalize=True, q_scale=0.7)),
            schema.POTENTIALS,
        ),
        "implicit_reward": (TeacherPotentials(implicit), schema.POTENTIALS),
        "reference": (
            ReferenceLogps(FrozenModelSpec(resolve_model("tiny-student"))),
            schema.REF_LOGPS,
        ),
    }
    for name, (actor, added) in columns.items():
        single, batched = actor(alone), actor(batch).slice(1)
        for column in added:
            got = batched.column(column).to_pylist()
            want = single.column(column).to_pylist()
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOL, msg=name)


# --- as plain Ray actors --------------------------------------------------------------------------


def test_same_classes_work_as_plain_ray_actors(ray_cluster, table, teacher_path):
    ray = ray_cluster
    settings = {"normalize": True, "q_scale": 0.7, "top_k": 8}
    student = resolve_model("tiny-student")
    # Both actors start at once: each start costs seconds here.
    spec = TeacherSpec(teacher_path, idle_priority=True, **settings)
    teacher = ray.remote(TeacherPotentials).remote(spec)
    reference = ray.remote(ReferenceLogps).remote(FrozenModelSpec(student))
    remote_teacher, remote_reference = ray.get(
        [teacher.__call__.remote(table), reference.__call__.remote(table)]
    )
    local_teacher = TeacherPotentials(TeacherSpec(teacher_path, **settings))(table)
    local_reference = ReferenceLogps(FrozenModelSpec(student))(table)
    for remote, local in ((remote_teacher, local_teacher), (remote_reference, local_reference)):
        assert remote.schema == local.schema
        values = [c for c in local.column_names if c not in (schema.TEACHER_S, schema.REFERENCE_S)]
        assert remote.select(values).equals(local.select(values))  # timings differ, values not

    # The pipeline's CPU actors yield the cores to the trainers; others keep normal scheduling.
    pids = ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in (teacher, reference)])
    assert [os.sched_getscheduler(pid) for pid in pids] == [os.SCHED_IDLE, os.SCHED_OTHER]


# --- a model spread by accelerate's device_map, part of it offloaded ------------------------------


@pytest.fixture(scope="module")
def untied_teacher_path(tmp_path_factory, teacher_path):
    """The tiny teacher with an LM head of its own, so the head alone can be offloaded."""
    tied = load_model(teacher_path)
    config = tied.config
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = type(tied)(config)
    model.load_state_dict(tied.state_dict(), strict=False)
    with torch.no_grad():
        noise = 0.05 * torch.randn_like(model.lm_head.weight)
        model.lm_head.weight.copy_(tied.lm_head.weight + noise)
    out = tmp_path_factory.mktemp("untied") / "model"
    model.save_pretrained(out)
    load_tokenizer(teacher_path).save_pretrained(out)
    return str(out)


OFFLOADED = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


def test_offloaded_teacher_and_reference_score_as_the_plain_model(
    table, untied_teacher_path, tmp_path
):
    offload = {"device_map": OFFLOADED, "offload_folder": str(tmp_path / "offload")}
    teacher = TeacherSpec(untied_teacher_path, normalize=True, q_scale=0.7, top_k=8)
    spread = TeacherPotentials(dataclasses.replace(teacher, **offload))
    # The head's weights really are on disk: the actor only sees a meta tensor.
    assert spread.model.get_output_embeddings().weight.device.type == "meta"
    plain_out, spread_out = TeacherPotentials(teacher)(table), spread(table)
    reference = FrozenModelSpec(untied_teacher_path)
    plain_ref = ReferenceLogps(reference)(table)
    spread_ref = ReferenceLogps(dataclasses.replace(reference, **offload))(table)
    scored = [*schema.POTENTIALS, schema.CHOSEN_TOPK_IDS, schema.CHOSEN_TOPK_LOGPS]
    for plain, spread, columns in [
        (plain_out, spread_out, scored),
        (plain_ref, spread_ref, schema.REF_LOGPS),
    ]:
        for column in columns:
            want = [torch.tensor(row) for row in plain.column(column).to_pylist()]
            if want[0].dim() == 1:  # a list per pair
                assert_lists_close(spread.column(column), want)
            else:
                got = torch.tensor(spread.column(column).to_pylist())
                torch.testing.assert_close(got, torch.stack(want), **TOL, msg=column)
