"""The student's training step (tvkd_ray/step.py) on tiny models, stage by stage, against the
direct computation: SFT trains on the chosen responses alone, behaviour cloning and top-k KD add
their terms, and the metric sums count what the trainers report. No Ray: the step is plain torch."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_actors_on_cpu import PAIRS, direct_logits, direct_token_logps, tokenized  # noqa: E402

from actors.inference import FrozenModelSpec  # noqa: E402
from actors.lockstep import Lockstep  # noqa: E402
from actors.reference import ReferenceLogps  # noqa: E402
from actors.teacher import TeacherPotentials, TeacherSpec  # noqa: E402
from actors.trainer import LearningRate  # noqa: E402
from tvkd_ray import schema  # noqa: E402
from tvkd_ray.config import load_config  # noqa: E402
from tvkd_ray.forward import ResponseLogps  # noqa: E402
from tvkd_ray.loss import kd_loss  # noqa: E402
from tvkd_ray.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from tvkd_ray.step import Objective, StudentStep  # noqa: E402

TOP_K = 4


@pytest.fixture(scope="module")
def student():
    return load_model(resolve_model("tiny-student")).eval()


@pytest.fixture(scope="module")
def scored():
    """The tokenised pairs with the tiny teacher's potentials and top-k, and reference log-probs."""
    table = tokenized(PAIRS)
    table = TeacherPotentials(TeacherSpec(resolve_model("tiny-teacher"), top_k=TOP_K))(table)
    return ReferenceLogps(FrozenModelSpec(resolve_model("tiny-student")))(table)


def step_for(student, *overrides) -> StudentStep:
    cfg = load_config(None, [f"teacher.top_k={TOP_K}", *overrides])
    pad = load_tokenizer(resolve_model("tiny-student")).pad_token_id
    return StudentStep(Objective.from_config(cfg), ResponseLogps(student), pad, "cpu")


def chosen_nll(student, table) -> torch.Tensor:
    rows = table.to_pylist()
    logps = [direct_token_logps(student, r[schema.PROMPT_IDS], r[schema.CHOSEN_IDS]) for r in rows]
    return -torch.cat(logps).mean()


def test_sft_trains_on_the_chosen_responses_only(student, scored):
    step = step_for(student, "run.stage=sft")
    tokens = scored.select([schema.PAIR_ID, *schema.TOKEN_IDS])  # what an SFT run streams
    loss, sums = step(tokens)
    torch.testing.assert_close(loss.detach(), chosen_nll(student, scored), rtol=1e-5, atol=1e-5)
    chosen_tokens = sum(len(ids) for ids in scored[schema.CHOSEN_IDS].to_pylist())
    assert sums["pairs"] == len(PAIRS) and sums["response_tokens"] == chosen_tokens
    # Another rejected response changes nothing: SFT never runs the rejected half.
    other = tokens.set_column(
        tokens.schema.get_field_index(schema.REJECTED_IDS),
        schema.REJECTED_IDS,
        pa.array([[5, 6, 7]] * len(PAIRS), pa.list_(pa.int32())),
    )
    assert step(other)[0].item() == pytest.approx(loss.item(), abs=1e-6)


def test_behaviour_cloning_and_kd_add_their_terms(student, scored):
    base, base_sums = step_for(student)(scored)
    with_bc, _ = step_for(student, "loss.bc_weight=0.5")(scored)
    nll = chosen_nll(student, scored)
    assert with_bc.item() == pytest.approx(base.item() + 0.5 * nll.item(), abs=1e-5)

    with_kd, kd_sums = step_for(student, "loss.kd_weight=2.0")(scored)
    rows = scored.to_pylist()
    logits = torch.cat(
        [direct_logits(student, r[schema.PROMPT_IDS], r[schema.CHOSEN_IDS]) for r in rows]
    )
    ids = torch.tensor([i for r in rows for i in r[schema.CHOSEN_TOPK_IDS]]).view(-1, TOP_K)
    teacher = torch.tensor([v for r in rows for v in r[schema.CHOSEN_TOPK_LOGPS]]).view(-1, TOP_K)
    student_topk = torch.log_softmax(logits, dim=-1).gather(-1, ids)
    expected = base.item() + 2.0 * kd_loss(student_topk, teacher).item()
    assert with_kd.item() == pytest.approx(expected, abs=1e-5)
    # What crossed from the teacher: its columns' bytes, the top-k included.
    payload = sum(
        scored.column(c).nbytes for c in schema.TEACHER_PAYLOAD if c in scored.schema.names
    )
    assert kd_sums["payload_bytes"] == base_sums["payload_bytes"] == payload


class Alone:
    """The collectives of a single worker (what actors.lockstep.Collective is with world 1)."""

    rank, world = 0, 1

    def sum(self, values):
        return list(values)

    def gather(self, value):
        return [value]


def test_a_step_of_uneven_micro_batches_averages_over_its_pairs(student, scored):
    """grad_accum=2 over micro-batches of 2 pairs and 1: the step's gradient is the mean over
    its 3 pairs (the one-pair micro-batch is not over-weighted), as for one batch of 3."""
    step = step_for(student)
    placeholder = schema.placeholder(scored.schema, 0, 0)
    micro = [(scored.slice(0, 2), 0.0), (scored.slice(2, 1), 0.0)]
    batches = Lockstep(Alone(), micro, placeholder).next_step(2)
    assert [b.weight for b in batches] == pytest.approx([2 / 3, 1 / 3])
    student.zero_grad()
    for batch in batches:
        (step(batch.table)[0] * batch.weight).backward()
    accumulated = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    step(scored)[0].backward()
    for got, want in zip(accumulated, (p.grad for p in student.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    student.zero_grad()


def test_learning_rate_warms_up_then_decays_to_the_last_step():
    """Over progress, not a planned step count: warm-up to the peak at warmup_ratio, cosine
    after; the last step of the run (starting just before progress 1) gets a small rate."""
    lr = LearningRate(1.0, warmup_ratio=0.25)
    assert lr.factor(0.0, 0.125) == pytest.approx(0.5)
    assert lr.factor(0.125, 0.25) == pytest.approx(1.0)
    assert lr.factor(0.25, 0.5) == pytest.approx(1.0)
    assert lr.factor(0.625, 0.75) == pytest.approx(0.5)
    assert 0 < lr.factor(0.95, 1.0) < 0.02
    assert LearningRate(1.0, 0.0).factor(0.0, 0.1) == 1.0


def test_release_scores_both_sides_on_the_teachers_top_k(student):
    """loss.objective=release: the teacher streams its top-k ids on the rejected responses too,
    and the step's loss is −log σ(R⁺ − R⁻) of the released recipe, checked against a loop."""
    table = tokenized(PAIRS)
    teacher = load_model(resolve_model("tiny-teacher")).eval()
    spec = TeacherSpec(resolve_model("tiny-teacher"), top_k=TOP_K, rejected_top_k=True)
    table = ReferenceLogps(FrozenModelSpec(resolve_model("tiny-student")))(
        TeacherPotentials(spec)(table)
    )
    rows = table.to_pylist()
    with torch.no_grad():
        top = direct_logits(teacher, rows[0][schema.PROMPT_IDS], rows[0][schema.REJECTED_IDS])
    ids = torch.tensor(rows[0][schema.REJECTED_TOPK_IDS]).view(-1, TOP_K)
    assert torch.equal(ids, top.topk(TOP_K, dim=-1).indices)

    loss, sums = step_for(student, "loss.objective=release", "loss.gamma=0.5")(table)

    def release_return(row, side):
        response = row[side]
        logps = torch.log_softmax(direct_logits(student, row[schema.PROMPT_IDS], response), -1)
        topk = schema.CHOSEN_TOPK_IDS if side == schema.CHOSEN_IDS else schema.REJECTED_TOPK_IDS
        ids = row[topk]
        total, entropies = 0.0, []
        for t, y in enumerate(response):
            top = ids[t * TOP_K : (t + 1) * TOP_K]
            probs = [logps[t, i].exp().item() for i in top]
            q = [*probs, 1.0 - sum(probs)]
            entropies.append(-sum(p * math.log(p) for p in q))
            total += logps[t, y].item() if y in top else math.log(q[-1])
        return total - 0.5 * sum(entropies[1:])  # H of each next state; 0 after the last

    with torch.no_grad():
        margins = [
            release_return(r, schema.CHOSEN_IDS) - release_return(r, schema.REJECTED_IDS)
            for r in rows
        ]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / len(rows)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    assert sums["tvkd/shaped_margins"] / len(rows) == pytest.approx(
        sum(margins) / len(rows), abs=1e-4
    )
