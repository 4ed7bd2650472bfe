"""Teacher potentials and chunked log-prob helpers (SPEC §2.2), against naive computations."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tvkd_ray.potentials import (
    implicit_reward_potentials,
    soft_value,
    soft_value_from_hidden,
    token_logps,
    token_logps_from_hidden,
    topk_logps_from_hidden,
)
from tvkd_ray.runtime import ACTOR_ALLOCATOR_ENV

REPO = Path(__file__).resolve().parents[1]


def head(weight, bias=None) -> torch.nn.Linear:
    """An LM head module holding ``weight`` (and ``bias``), as the helpers take it."""
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = torch.nn.Parameter(bias, requires_grad=False)
    return linear


def _lm_head(n=37, hidden=16, vocab=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, hidden, generator=gen),
        torch.randn(vocab, hidden, generator=gen) / 2,
        torch.randn(vocab, generator=gen),
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 3.407606),
        ({"tau": 2.0}, 4.360539),
        ({"normalize": True, "q_scale": 0.7}, 0.270388),
    ],
)
def test_soft_value_worked_example(kwargs, expected):
    value = soft_value(torch.tensor([1.0, 2.0, 3.0]), **kwargs)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # log(.5^.7 + .2^.7 + .3^.7): the top-2 and the rest bucket .15 + .1 + .05 = .3
        ({"q_scale": 0.7, "top_k": 2}, 0.314968),
        # the whole vocabulary: log(.5^.7 + .2^.7 + .15^.7 + .1^.7 + .05^.7)
        ({"q_scale": 0.7}, 0.423347),
        # tau 2: 2 · log(.5^.35 + .2^.35 + .3^.35)
        ({"q_scale": 0.7, "tau": 2.0, "top_k": 2}, 1.396312),
    ],
)
def test_bounded_soft_value_on_top_k_plus_rest_worked_example(kwargs, expected):
    """The TVKD authors' bounded teacher-only soft value: log_softmax, then top-k + rest."""
    logits = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log() + 3.0  # any shift: normalised
    value = soft_value(logits, normalize=True, **kwargs)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_soft_value_reduces_last_axis_in_float32():
    logits = torch.randn(2, 3, 50, dtype=torch.float64).to(torch.bfloat16)
    value = soft_value(logits, tau=0.5, q_scale=0.7, normalize=True)
    z = torch.log_softmax(logits.double(), dim=-1)
    expected = 0.5 * torch.logsumexp(0.7 * z / 0.5, dim=-1)
    assert value.shape == (2, 3) and value.dtype == torch.float32
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-6)


def test_huge_logits_do_not_overflow():
    logits = torch.tensor([[1e4, -1e4, 1e4 - 1.0, 3.0], [-1e4, -1e4 + 2.0, -1e4, 0.0]])
    exact = logits.double()
    torch.testing.assert_close(soft_value(logits).double(), torch.logsumexp(exact, -1))
    torch.testing.assert_close(
        soft_value(logits, q_scale=0.7, normalize=True).double(),
        torch.logsumexp(0.7 * torch.log_softmax(exact, -1), -1),
    )
    ids = torch.tensor([2, 1])
    logps = token_logps(logits, ids)
    assert torch.isfinite(logps).all()
    expected = torch.log_softmax(exact, -1).gather(-1, ids[:, None]).squeeze(-1)
    # gather − logsumexp rounds at the logits' magnitude: float32's spacing at 1e4 is ~1e-3.
    torch.testing.assert_close(logps.double(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 37, 100])
@pytest.mark.parametrize(
    "kwargs", [{}, {"tau": 2.0, "q_scale": 0.5}, {"normalize": True, "q_scale": 0.7}]
)
def test_soft_value_from_hidden_matches_full_logits(chunk_size, kwargs):
    hidden, weight, bias = _lm_head()
    got = soft_value_from_hidden(hidden, head(weight, bias), chunk_size=chunk_size, **kwargs)
    expected = soft_value(hidden @ weight.T + bias, **kwargs)
    assert got.shape == (37,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_from_hidden_upcasts_bf16_logits_per_chunk():
    hidden, weight, _ = _lm_head()
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    logits = (hidden @ weight.T).float()
    ids = torch.arange(37)
    with torch.inference_mode():
        values = soft_value_from_hidden(hidden, head(weight), chunk_size=8)
        logps = token_logps_from_hidden(hidden, head(weight), ids, chunk_size=8)
        _, top = topk_logps_from_hidden(hidden, head(weight), 3, chunk_size=8)
    assert values.dtype == logps.dtype == top.dtype == torch.float32
    torch.testing.assert_close(values, torch.logsumexp(logits, -1))
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(logps, full.gather(-1, ids[:, None]).squeeze(-1))
    torch.testing.assert_close(top, full.topk(3, dim=-1).values)


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_token_logps_matches_log_softmax_gather_with_grads(chunk_size):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 11, 40, generator=gen, requires_grad=True)
    ids = torch.randint(0, 40, (3, 11), generator=gen, dtype=torch.int32)
    got = token_logps(logits, ids, chunk_size=chunk_size)
    (got_grad,) = torch.autograd.grad((got * torch.arange(11)).sum(), logits)
    expected = torch.log_softmax(logits, -1).gather(-1, ids.long()[..., None]).squeeze(-1)
    (expected_grad,) = torch.autograd.grad((expected * torch.arange(11)).sum(), logits)
    assert got.shape == (3, 11) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_token_logps_with_trailing_k(chunk_size):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 40, generator=gen)
    ids = torch.randint(0, 40, (2, 9, 5), generator=gen)
    got = token_logps(logits, ids, chunk_size=chunk_size)
    assert got.shape == (2, 9, 5)
    torch.testing.assert_close(got, torch.log_softmax(logits, -1).gather(-1, ids))


@pytest.mark.parametrize("chunk_size", [None, 1, 6])
def test_token_logps_from_hidden_matches_full_logits(chunk_size):
    hidden, weight, bias = _lm_head()
    full = torch.log_softmax(hidden @ weight.T + bias, -1)
    ids = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(3))
    ids_k = torch.randint(0, 300, (37, 4), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        one = token_logps_from_hidden(hidden, head(weight, bias), ids, chunk_size=chunk_size)
        many = token_logps_from_hidden(hidden, head(weight, bias), ids_k, chunk_size=chunk_size)
    torch.testing.assert_close(one, full.gather(-1, ids[:, None]).squeeze(-1))
    torch.testing.assert_close(many, full.gather(-1, ids_k))


@pytest.mark.parametrize("chunk_size", [None, 1, 10])
def test_topk_logps_from_hidden_matches_torch_topk(chunk_size):
    hidden, weight, bias = _lm_head()
    ids, logps = topk_logps_from_hidden(hidden, head(weight, bias), 5, chunk_size=chunk_size)
    expected = torch.log_softmax(hidden @ weight.T + bias, -1).topk(5, dim=-1)
    assert ids.dtype == torch.int64 and logps.dtype == torch.float32
    assert ids.shape == logps.shape == (37, 5)
    torch.testing.assert_close(ids, expected.indices)
    torch.testing.assert_close(logps, expected.values)


def _implicit_reward_loop(logps, ref_logps, mask, beta):
    out = torch.zeros(logps.shape, dtype=torch.float64)
    for b in range(logps.shape[0]):
        running = 0.0
        for t in range(logps.shape[1]):
            if mask[b, t]:
                out[b, t] = beta * running
                running += float(logps[b, t]) - float(ref_logps[b, t])
    return out


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.tuples(st.booleans(), st.floats(-20, 0), st.floats(-20, 0)), min_size=6, max_size=6
        ),
        min_size=1,
        max_size=4,
    ),
    beta=st.floats(0.01, 2.0),
)
def test_implicit_reward_potentials_match_loop(rows, beta):
    mask = torch.tensor([[m for m, _, _ in row] for row in rows])
    logps = torch.tensor([[lp for _, lp, _ in row] for row in rows])
    ref_logps = torch.tensor([[ref for _, _, ref in row] for row in rows])
    expected = _implicit_reward_loop(logps, ref_logps, mask, beta)
    # Garbage outside the mask must not leak in.
    logps = torch.where(mask, logps, float("nan"))
    got = implicit_reward_potentials(logps, ref_logps, mask, beta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_implicit_reward_potentials_left_padding_equals_right_padding():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.7, 0.0, 0.0]])
    right = torch.tensor([[True, True, True, False, False]])
    left = right.roll(2, dims=-1)
    got_right = implicit_reward_potentials(logps, ref, right, 0.1)
    got_left = implicit_reward_potentials(logps.roll(2, -1), ref.roll(2, -1), left, 0.1)
    torch.testing.assert_close(got_right, torch.tensor([[0.0, 0.05, -0.05, 0.0, 0.0]]))
    torch.testing.assert_close(got_left, got_right.roll(2, -1))


# Prints the peak RSS growth in KiB of each path, one "name kib" line each. Clearing the
# kernel's high-water mark (VmHWM) before a path makes it measure that path alone; ru_maxrss
# would not do, as clear_refs does not reset it and earlier peaks (the logits) hide later ones.
_MEMORY_PROBE = """
import torch
from tvkd_ray.potentials import (
    soft_value, soft_value_from_hidden, token_logps, token_logps_from_hidden,
    topk_logps_from_hidden)

torch.manual_seed(0)
hidden = torch.randn(2048, 64)
weight = torch.randn(32000, 64) / 8
head = torch.nn.Linear(64, 32000, bias=False).requires_grad_(False)
head.weight.copy_(weight)
ids = torch.randint(0, 32000, (2048,))
logits = torch.nn.functional.linear(hidden, weight).view(4, 512, 32000)
paths = {
    "soft_value_from_hidden": lambda n: soft_value_from_hidden(
        hidden[:n], head, chunk_size=CHUNK),
    "token_logps_from_hidden": lambda n: token_logps_from_hidden(
        hidden[:n], head, ids[:n], chunk_size=CHUNK),
    "topk_logps_from_hidden": lambda n: topk_logps_from_hidden(
        hidden[:n], head, 32, chunk_size=CHUNK),
    "token_logps": lambda n: token_logps(
        logits.view(-1, 32000)[:n], ids[:n], chunk_size=CHUNK),
    "naive_soft_value": lambda n: soft_value(hidden[:n] @ weight.T),
    "naive_token_logps": lambda n: torch.log_softmax(logits.view(-1, 32000)[:n], -1).gather(
        -1, ids[:n, None]),
}
def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

for name, run in paths.items():
    run(8)  # warm up kernels and thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    run(2048)
    print(name, status_kib("VmHWM") - before)
"""

# glibc's dynamic mmap threshold keeps freed chunk-sized blocks in a heap that torch's aligned
# allocations fragment, so RSS would measure the allocator's retention rather than the tensors
# alive at once; the actors' settings return every block of 1 MiB or more to the OS when freed.
_LIVE_MEMORY_ENV = {**ACTOR_ALLOCATOR_ENV, "OMP_NUM_THREADS": "1"}
_FULL_LOGITS_KIB = 2048 * 32000 * 4 // 1024
_CHUNK_ROWS = 64


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_chunked_paths_keep_peak_memory_far_below_full_logits():
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE.replace("CHUNK", str(_CHUNK_ROWS))],
        cwd=REPO,
        env={**os.environ, **_LIVE_MEMORY_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    growth_kib = {name: int(kib) for name, kib in map(str.split, proc.stdout.splitlines())}
    assert len(growth_kib) == 6, proc.stdout
    for name, kib in growth_kib.items():
        if name.startswith("naive_"):
            assert kib > _FULL_LOGITS_KIB / 4, growth_kib
        else:
            assert kib < _FULL_LOGITS_KIB / 4, growth_kib
