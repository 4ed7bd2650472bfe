"""The student's training step (tvkd_ray/step.py) on tiny models, stage by stage, against the
direct computation: SFT trains on the chosen responses alone, behaviour cloning and top-k KD add
their terms, and the metric sums count what the trainers report. No Ray: the step is plain torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_actors_on_cpu import PAIRS, direct_logits, direct_token_logps, tokenized  # noqa: E402

from actors.inference import FrozenModelSpec  # noqa: E402
from actors.reference import ReferenceLogps  # noqa: E402
from actors.teacher import TeacherPotentials, TeacherSpec  # noqa: E402
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
    payload = sum(scored.column(c).nbytes for c in schema.TEACHER_PAYLOAD)
    assert kd_sums["payload_bytes"] == base_sums["payload_bytes"] == payload
