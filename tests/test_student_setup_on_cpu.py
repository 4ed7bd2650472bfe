"""The student as the trainers set it up (tvkd_ray.models.load_student, actors.parallel), without
Ray: gradient checkpointing changes no number, a LoRA student starts exactly as its base (the
reference) and checkpoints only its adapters, and an FSDP step over two gloo processes updates
the weights as one process does on the whole batch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from test_actors_on_cpu import tokenized  # noqa: E402

from actors.checkpoint import TrainState, load_checkpoint, save_checkpoint  # noqa: E402
from actors.inference import FrozenModelSpec  # noqa: E402
from actors.parallel import Replicated, Sharded  # noqa: E402
from actors.reference import ReferenceLogps  # noqa: E402
from actors.teacher import TeacherPotentials, TeacherSpec  # noqa: E402
from tvkd_ray.config import load_config  # noqa: E402
from tvkd_ray.errors import CheckpointError  # noqa: E402
from tvkd_ray.forward import ResponseLogps  # noqa: E402
from tvkd_ray.models import load_student, load_tokenizer, resolve_model  # noqa: E402
from tvkd_ray.step import Objective, StudentStep, apply_gradients  # noqa: E402

ARITHMETIC = [
    (f"User: What is {a} plus {b}?\nAssistant:", f" {a} + {b} = {a + b}.", f" {a + b + 1}.")
    for a, b in [(1, 2), (3, 4), (5, 9), (7, 7), (2, 8), (6, 1), (9, 9), (4, 12)]
]


@pytest.fixture(scope="module")
def student_path():
    return resolve_model("tiny-student")


@pytest.fixture(scope="module")
def scored(student_path):
    """Eight pairs with the tiny teacher's potentials and the student's reference log-probs."""
    table = TeacherPotentials(TeacherSpec(resolve_model("tiny-teacher")))(tokenized(ARITHMETIC))
    return ReferenceLogps(FrozenModelSpec(student_path))(table)


def student_config(*overrides):
    return load_config(None, ["student.model=tiny-student", "student.num_layers=null", *overrides])


def step_for(policy, cfg) -> StudentStep:
    pad = load_tokenizer(resolve_model("tiny-student")).pad_token_id
    return StudentStep(Objective.from_config(cfg), policy, pad, "cpu")


def loss_and_grads(model, cfg, table):
    model.train().zero_grad()
    loss, sums = step_for(ResponseLogps(model), cfg)(table)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), sums, grads


def test_gradient_checkpointing_changes_no_loss_or_gradient(student_path, scored):
    cfg = student_config()
    plain = load_student(student_path, cfg.student)
    checkpointed = load_student(student_path, cfg.student, gradient_checkpointing=True)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    loss, _, grads = loss_and_grads(plain, cfg, scored)
    loss_ckpt, _, grads_ckpt = loss_and_grads(checkpointed, cfg, scored)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert grads_ckpt.keys() == grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_lora_student_starts_as_its_base_and_checkpoints_its_adapters(
    student_path, scored, tmp_path
):
    cfg = student_config("student.lora.r=4", "student.lora.dropout=0.0")
    lora = load_student(student_path, cfg.student, gradient_checkpointing=True)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # B = 0: the student's log-probs are exactly the reference's, so every margin is a tie.
    loss, sums, grads = loss_and_grads(lora, cfg, scored)
    assert sums["rewards/margins"] == 0.0 and sums["rewards/accuracies"] == 0.0
    assert set(grads) == set(trainable)

    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    apply_gradients(lora, optimizer, max_grad_norm=1.0)
    strategy = Replicated(world=1, device=torch.device("cpu"))
    weights, optimizer_state = strategy.state_dicts(lora, optimizer)
    assert set(weights) == set(trainable)  # the adapters, not the frozen base
    save_checkpoint(tmp_path, weights, optimizer_state, TrainState(step=1), torch.arange(3))

    fresh = load_student(student_path, cfg.student)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad])
    restored = load_checkpoint(tmp_path, str(tmp_path))
    strategy.load_state_dicts(fresh, fresh_optimizer, restored.weights, restored.optimizer_state)
    assert restored.state.step == 1
    after, before = dict(fresh.named_parameters()), dict(lora.named_parameters())
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, msg=name)
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()

    # The same checkpoint does not fit a full-model student: one clear line, not a crash.
    full = load_student(student_path, student_config().student)
    with pytest.raises(CheckpointError, match="lacks"):
        strategy.load_state_dicts(full, optimizer, restored.weights, restored.optimizer_state)


# --- FSDP over two gloo processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_step(model, cfg, micro_batches, strategy: Replicated, weight: float):
    """(gradient norm, optimiser) of one step over ``micro_batches``, each loss scaled by
    ``weight``, as the trainer takes it. SGD, not AdamW: Adam's first step is blind to the
    gradient's scale, SGD's update shows any error in it."""
    model.train()
    policy = strategy.wrap(ResponseLogps(model))
    step = step_for(policy, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i, table in enumerate(micro_batches):
        with strategy.gradient_sync(policy, enabled=i == len(micro_batches) - 1):
            (step(table)[0] * weight).backward()
    return apply_gradients(model, optimizer, max_grad_norm=1.0), optimizer


def _fsdp_worker(rank: int, port: int, shards: list, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = student_config("train.strategy=fsdp", "train.gradient_checkpointing=true")
    model = load_student(resolve_model("tiny-student"), cfg.student, gradient_checkpointing=True)
    sharded = Sharded(world=2, device=torch.device("cpu"))
    # Two micro-batches per worker, each loss weighted 1/2: the step's mean over 8 pairs.
    grad_norm, optimizer = _one_step(model, cfg, shards[rank], sharded, weight=0.5)
    weights, optimizer_state = sharded.state_dicts(model, optimizer)
    full = sharded.full_weights(model)
    # What a resumed worker does: rank 0 wrote the checkpoint, every worker reads it whole
    # and a fresh sharded student takes its shard of it.
    checkpoint = Path(out_dir) / "checkpoint.pt"
    if rank == 0:
        torch.save({"weights": weights, "optim": optimizer_state}, checkpoint)
    dist.barrier()
    saved = torch.load(checkpoint, weights_only=True)
    fresh = load_student(resolve_model("tiny-student"), cfg.student)
    sharded.wrap(ResponseLogps(fresh))
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    sharded.load_state_dicts(fresh, fresh_optimizer, saved["weights"], saved["optim"])
    restored = sharded.full_weights(fresh)
    if rank == 0:
        torch.save(
            {"grad_norm": grad_norm, "weights": weights, "full": full, "restored": restored},
            Path(out_dir) / "fsdp.pt",
        )
    dist.destroy_process_group()


def test_fsdp_step_updates_as_one_process_on_the_whole_batch(student_path, scored, tmp_path):
    import torch.multiprocessing as mp

    halves = [scored.slice(0, 4), scored.slice(4, 4)]
    shards = [[half.slice(0, 2), half.slice(2, 2)] for half in halves]
    mp.spawn(_fsdp_worker, args=(_free_port(), shards, str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    cfg = student_config()
    model = load_student(student_path, cfg.student)
    one = Replicated(world=1, device=torch.device("cpu"))
    grad_norm, _ = _one_step(model, cfg, [pa.concat_tables(halves)], one, weight=1.0)
    assert got["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
    expected = dict(model.named_parameters())
    assert set(got["weights"]) == set(expected)  # one name per tied weight
    for name, value in got["weights"].items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=1e-5, atol=1e-6)
    # The whole state dict, for save_pretrained: every key of the model's own.
    assert set(got["full"]) == set(model.state_dict())
    for name, value in got["full"].items():
        torch.testing.assert_close(got["restored"][name], value, rtol=0, atol=0, msg=name)
