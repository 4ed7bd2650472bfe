"""The TVKD objective (SPEC §2.3–2.5): worked example, DPO equivalence, shaping properties."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tvkd_ray.loss import (
    Sides,
    TVKDLossOutput,
    bc_loss,
    kd_loss,
    preference_metrics,
    release_loss,
    release_returns,
    shaping_return,
    tvkd_loss,
)

NAN = float("nan")


def _worked_example():
    """SPEC §2.4; the unmasked "·" entries are garbage that must be ignored."""
    return {
        "policy_chosen_logps": torch.tensor([-5.0, -3.0]),
        "policy_rejected_logps": torch.tensor([-6.0, -2.5]),
        "ref_chosen_logps": torch.tensor([-5.5, -3.2]),
        "ref_rejected_logps": torch.tensor([-5.8, -2.4]),
        "chosen_potentials": torch.tensor([[1.0, 2.0, 0.5, 7.0], [0.3, -0.2, NAN, -9.0]]),
        "rejected_potentials": torch.tensor([[1.0, 0.0, 1e3, NAN], [0.3, 0.4, 0.8, 1.2]]),
        "chosen_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool),
        "rejected_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
    }


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=atol)


def _shaping_loop(potentials, mask, gamma, center=False):
    """S(y) written straight from SPEC §2.3: walk each row's masked positions."""
    out = []
    for phi_row, mask_row in zip(potentials.tolist(), mask.tolist()):
        phi = [p for p, m in zip(phi_row, mask_row) if m]
        if center and phi:
            phi = [p - phi[0] for p in phi]
        nxt = phi[1:] + [0.0]  # Φ(terminal) = 0
        out.append(sum(gamma * n - p for p, n in zip(phi, nxt)))
    return torch.tensor(out, dtype=torch.float64)


def _dpo_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing=0.0):
    """TRL's DPOTrainer sigmoid loss, written out independently."""
    logits = (pc - pr) - (rc - rr)
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses.mean()


def test_worked_example_shaping_return():
    ex = _worked_example()
    _close(shaping_return(ex["chosen_potentials"], ex["chosen_mask"], 0.9), [-1.25, -0.28])
    _close(shaping_return(ex["rejected_potentials"], ex["rejected_mask"], 0.9), [-1.0, -0.54])


@pytest.mark.parametrize(
    ("center", "chosen_shaping", "rejected_shaping", "margins", "loss"),
    [
        (False, [-0.625, -0.14], [-0.5, -0.27], [-0.055, 0.16], 0.668685),
        (True, [-0.025, 0.025], [0.05, -0.075], [-0.005, 0.13], 0.662954),
    ],
)
def test_worked_example_tvkd_loss(center, chosen_shaping, rejected_shaping, margins, loss):
    out = tvkd_loss(**_worked_example(), beta=0.1, alpha=0.5, gamma=0.9, center=center)
    _close(out.chosen_rewards, [0.05, 0.02])
    _close(out.rejected_rewards, [-0.02, -0.01])
    _close(out.chosen_shaping, chosen_shaping)
    _close(out.rejected_shaping, rejected_shaping)
    _close(out.margins, margins)
    assert out.loss.shape == ()
    assert out.loss.item() == pytest.approx(loss, abs=1e-6)


def test_worked_example_alpha_zero_is_dpo():
    ex = _worked_example()
    out = tvkd_loss(**ex, beta=0.1, alpha=0.0, gamma=0.9)
    assert out.loss.item() == pytest.approx(0.668510, abs=1e-6)
    _close(out.chosen_shaping, [0.0, 0.0])
    _close(out.rejected_shaping, [0.0, 0.0])


@settings(max_examples=30, deadline=None)
@given(
    logps=st.lists(st.floats(-50, 0), min_size=12, max_size=12),
    beta=st.floats(0.01, 1.0),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_alpha_zero_equals_dpo_sigmoid_loss_without_potentials(logps, beta, label_smoothing):
    pc, pr, rc, rr = torch.tensor(logps, dtype=torch.float32).view(4, 3)
    mask = torch.ones(3, 2, dtype=torch.bool)
    out = tvkd_loss(
        pc, pr, rc, rr, None, None, mask, mask,
        beta=beta, alpha=0.0, gamma=0.9, label_smoothing=label_smoothing,
    )  # fmt: skip
    expected = _dpo_sigmoid_loss(pc, pr, rc, rr, beta, label_smoothing)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.margins, beta * ((pc - rc) - (pr - rr)))


def test_gamma_one_shaping_cancels_between_pairs_sharing_a_prompt():
    ex = _worked_example()
    # Same prompt state s_1 for y⁺ and y⁻: equal first potentials.
    ex["rejected_potentials"][:, 0] = ex["chosen_potentials"][:, 0]
    dpo = tvkd_loss(**ex, beta=0.1, alpha=0.0, gamma=1.0).margins
    for center in (False, True):
        out = tvkd_loss(**ex, beta=0.1, alpha=0.5, gamma=1.0, center=center)
        torch.testing.assert_close(out.margins, dpo)
    # Centred, γ = 1 cancels for any potentials: S(y) = −Φ'(s_1) = 0.
    centred = shaping_return(torch.randn(3, 5), torch.rand(3, 5) > 0.3, 1.0, center=True)
    torch.testing.assert_close(centred, torch.zeros(3))


masks_and_potentials = st.integers(1, 4).flatmap(
    lambda rows: st.tuples(
        st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=rows, max_size=rows),
        st.lists(
            st.lists(st.floats(-10, 10), min_size=7, max_size=7), min_size=rows, max_size=rows
        ),
    )
)


@settings(max_examples=60, deadline=None)
@given(data=masks_and_potentials, gamma=st.floats(0.0, 1.0), center=st.booleans())
def test_shaping_return_matches_next_masked_position_loop(data, gamma, center):
    mask, potentials = torch.tensor(data[0]), torch.tensor(data[1])
    expected = _shaping_loop(potentials, mask, gamma, center)
    got = shaping_return(potentials, mask, gamma, center)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    data=masks_and_potentials,
    gamma=st.floats(0.0, 1.0),
    row=st.integers(0, 3),
    shift=st.floats(-100, 100),
)
def test_centred_shaping_ignores_a_constant_added_to_a_row(data, gamma, row, shift):
    mask, potentials = torch.tensor(data[0]), torch.tensor(data[1])
    shifted = potentials.clone()
    shifted[row % len(shifted)] += shift
    torch.testing.assert_close(
        shaping_return(shifted, mask, gamma, center=True),
        shaping_return(potentials, mask, gamma, center=True),
        rtol=1e-5,
        atol=1e-3,
    )


def test_non_contiguous_mask_uses_next_masked_position():
    potentials = torch.tensor([[1.0, 50.0, 2.0, NAN, 4.0]])
    mask = torch.tensor([[True, False, True, False, True]])
    # F = (0.5·2 − 1) + (0.5·4 − 2) + (0 − 4)
    _close(shaping_return(potentials, mask, 0.5), [-4.0])
    # Centred: Φ' = [0, 1, 3] → (0.5 − 0) + (1.5 − 1) + (0 − 3)
    _close(shaping_return(potentials, mask, 0.5, center=True), [-2.0])


def test_left_padding_equals_right_padding():
    ex = _worked_example()
    left = {
        **ex,
        "chosen_potentials": torch.tensor([[9.0, 1.0, 2.0, 0.5], [NAN, NAN, 0.3, -0.2]]),
        "chosen_mask": torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool),
        "rejected_potentials": torch.tensor([[5.0, 5.0, 1.0, 0.0], [0.3, 0.4, 0.8, 1.2]]),
        "rejected_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool),
    }
    for center in (False, True):
        right_out = tvkd_loss(**ex, beta=0.1, alpha=0.5, gamma=0.9, center=center)
        left_out = tvkd_loss(**left, beta=0.1, alpha=0.5, gamma=0.9, center=center)
        torch.testing.assert_close(left_out.margins, right_out.margins)
        torch.testing.assert_close(left_out.loss, right_out.loss)


def test_empty_rows_give_zero_shaping():
    potentials = torch.tensor([[3.0, 4.0], [NAN, 2.0], [1.0, 1.0]])
    mask = torch.tensor([[False, False], [False, False], [True, False]])
    _close(shaping_return(potentials, mask, 0.9), [0.0, 0.0, -1.0])
    _close(shaping_return(potentials, mask, 0.9, center=True), [0.0, 0.0, 0.0])


def test_gradients_reach_only_policy_logps():
    ex = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in _worked_example().items()}
    out = tvkd_loss(**ex, beta=0.1, alpha=0.5, gamma=0.9, center=True)
    out.loss.backward()
    for name in ("policy_chosen_logps", "policy_rejected_logps"):
        assert ex[name].grad is not None and ex[name].grad.abs().sum() > 0
    for name in ("ref_chosen_logps", "ref_rejected_logps"):
        assert ex[name].grad is None
    for name in ("chosen_potentials", "rejected_potentials"):
        assert ex[name].grad is None
    # dL/dlogπ(y⁺) = −β · σ(−Δ) / B for ε = 0.
    expected = -0.1 * torch.sigmoid(-out.margins) / 2
    torch.testing.assert_close(ex["policy_chosen_logps"].grad, expected)


def test_bc_loss_is_mean_masked_nll():
    logps = torch.tensor([[-1.0, -2.0, NAN], [-4.0, -100.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    loss = bc_loss(logps, mask)
    assert loss.item() == pytest.approx((1.0 + 2.0 + 4.0 + 0.5) / 4)
    loss.backward()
    _close(logps.grad, [[-0.25, -0.25, 0.0], [-0.25, 0.0, -0.25]])
    assert bc_loss(logps, torch.zeros_like(mask)).item() == 0.0


def test_kd_loss_is_zero_for_equal_distributions_and_positive_otherwise():
    gen = torch.Generator().manual_seed(0)
    full = torch.log_softmax(torch.randn(6, 20, generator=gen), -1)
    teacher = full.topk(4, dim=-1).values
    assert kd_loss(teacher.clone(), teacher).item() == 0.0
    student_full = torch.log_softmax(torch.randn(6, 20, generator=gen), -1)
    student = student_full.gather(-1, full.topk(4, dim=-1).indices)
    assert kd_loss(student, teacher).item() > 0.01


def test_kd_loss_hand_computation_and_student_only_gradient():
    teacher = torch.tensor([[0.5, 0.3], [0.6, 0.2]]).log().requires_grad_()
    student = torch.tensor([[0.4, 0.4], [0.6, 0.2]]).log().requires_grad_()
    # Row 0 rest buckets: teacher 0.2, student 0.2; row 1 is identical (KL 0).
    kl_row0 = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    loss = kd_loss(student, teacher)
    assert loss.item() == pytest.approx(kl_row0 / 2, abs=1e-6)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # Padded layout [B, T, k] with a mask averages over the masked positions only.
    padded_t = torch.stack([teacher.detach(), torch.zeros(2, 2)])
    padded_s = torch.stack([student.detach(), torch.full((2, 2), NAN)])
    mask = torch.tensor([[True, True], [False, False]])
    assert kd_loss(padded_s, padded_t, mask).item() == pytest.approx(kl_row0 / 2, abs=1e-6)


def test_kd_loss_rest_bucket_survives_full_topk_mass():
    # Top-k covering the whole vocabulary: 1 − Σp rounds to ≤ 0 and must not give NaN/inf.
    full = torch.log_softmax(torch.randn(3, 8), -1)
    student = torch.log_softmax(torch.randn(3, 8), -1).requires_grad_()
    loss = kd_loss(student, full)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    exact = (full.exp() * (full - student)).sum(-1).mean()
    assert loss.item() == pytest.approx(exact.item(), abs=1e-4)


def test_preference_metrics_on_worked_example():
    ex = _worked_example()
    out = tvkd_loss(**ex, beta=0.1, alpha=0.5, gamma=0.9)
    assert isinstance(out, TVKDLossOutput)
    metrics = preference_metrics(
        out,
        policy_logps=Sides(ex["policy_chosen_logps"], ex["policy_rejected_logps"]),
        potentials=Sides(ex["chosen_potentials"], ex["rejected_potentials"]),
        masks=Sides(ex["chosen_mask"], ex["rejected_mask"]),
    )
    expected = {
        "loss": 0.668685,
        "rewards/chosen": 0.035,
        "rewards/rejected": -0.015,
        "rewards/margins": 0.05,
        "rewards/accuracies": 1.0,
        "logps/chosen": -4.0,
        "logps/rejected": -4.25,
        "tvkd/shaping_chosen": -0.3825,
        "tvkd/shaping_rejected": -0.385,
        "tvkd/shaped_margins": 0.0525,
        "tvkd/shaped_accuracies": 0.5,
        # (1 + 2 + 0.5 + 0.3 − 0.2 + 1 + 0 + 0.3 + 0.4 + 0.8 + 1.2) / 11
        "tvkd/potential_mean": 7.3 / 11,
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert isinstance(metrics[name], float)
        assert metrics[name] == pytest.approx(value, abs=1e-6), name

    dpo = tvkd_loss(**ex, beta=0.1, alpha=0.0, gamma=0.9)
    policy = Sides(ex["policy_chosen_logps"], ex["policy_rejected_logps"])
    without = preference_metrics(dpo, policy_logps=policy)
    assert "tvkd/potential_mean" not in without
    assert without["tvkd/shaping_chosen"] == 0.0
    assert without["tvkd/shaped_margins"] == pytest.approx(0.05, abs=1e-6)


def test_float_noise_margins_are_ties_not_wins():
    """Policy = reference up to float rounding (margins of ~1e-7 of the log-probs) counts no
    win in any accuracy; a margin above the tolerance does."""
    ref = torch.tensor([-300.0, -420.0, -250.0])
    rejected = torch.tensor([-310.0, -400.0, -260.0])
    mask = torch.ones(3, 4, dtype=torch.bool)

    def metrics_of(policy_chosen: torch.Tensor) -> dict[str, float]:
        out = tvkd_loss(
            policy_chosen_logps=policy_chosen,
            policy_rejected_logps=rejected,
            ref_chosen_logps=ref,
            ref_rejected_logps=rejected,
            chosen_potentials=torch.zeros(3, 4),
            rejected_potentials=torch.zeros(3, 4),
            chosen_mask=mask,
            rejected_mask=mask,
            beta=0.1,
            alpha=0.5,
            gamma=1.0,
        )
        return preference_metrics(out, policy_logps=Sides(policy_chosen, rejected))

    noise = ref * 6.4e-8 * torch.tensor([1.0, -1.0, 1.0])  # as measured between batch shapes
    assert ((ref + noise) != ref).any()  # the noise is there
    noisy = metrics_of(ref + noise)
    assert noisy["rewards/accuracies"] == 0.0 and noisy["tvkd/shaped_accuracies"] == 0.0
    learnt = metrics_of(ref + torch.tensor([0.01, -0.01, 0.01]))  # 1e-3 reward: a preference
    assert learnt["rewards/accuracies"] == pytest.approx(2 / 3)
    assert learnt["tvkd/shaped_accuracies"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("center", [False, True])
def test_shaping_picture_terms_sum_to_the_loss_shaping_return(center):
    """The per-token F_t the run's shaping picture draws are the terms the loss sums."""
    from tvkd_ray.figures import shaping_terms

    phi = torch.randn(1, 7)
    _, terms = shaping_terms(phi[0].tolist(), 0.9, center)
    expected = shaping_return(phi, torch.ones(1, 7, dtype=torch.bool), 0.9, center=center)
    assert terms.sum() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)


# ------------------------------------------------------------- the released recipe (release)


def _release_example(gamma: float):
    """One pair, vocabulary 4, teacher top-2. Student probabilities and teacher top-2 ids:
    chosen t0 [.4 .3 .2 .1], top {0, 2}, y=2 (in the top-k): q̂ = [.4 .2 | .4], log q̂(y) = log .2;
    chosen t1 [.1 .6 .2 .1], top {0, 3}, y=1 (outside: the rest bucket): q̂ = [.1 .1 | .8],
    log q̂(y) = log .8, H = −(2 · .1 log .1 + .8 log .8) = 0.639032;
    rejected t0 uniform, top {1, 2}, y=3 (outside): log q̂(y) = log .5, terminal.
    R⁺ = log .2 − γ · 0.639032 + log .8 (its last state is terminal), R⁻ = log .5."""
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25] * 4])
    logits = probs.log().requires_grad_(True)
    logps = torch.log_softmax(logits, dim=-1)
    ids, tokens = torch.tensor([[0, 2], [0, 3], [1, 2]]), torch.tensor([2, 1, 3])
    returns = release_returns(
        logps.gather(-1, tokens[:, None]).squeeze(-1),
        logps.gather(-1, ids),
        (ids == tokens[:, None]).any(dim=-1),
        torch.tensor([0, 0, 1]),
        2,
        gamma=gamma,
    )
    return logits, returns


@pytest.mark.parametrize(("gamma", "chosen"), [(1.0, -2.471613), (0.0, -1.832581)])
def test_release_returns_worked_example(gamma, chosen):
    _, returns = _release_example(gamma)
    assert returns.tolist() == pytest.approx([chosen, -0.693147], abs=1e-6)


def test_release_loss_worked_example_and_gradient_through_the_entropy():
    logits, returns = _release_example(1.0)
    zeros = torch.zeros(1)
    out = release_loss(
        returns[:1],
        returns[1:],
        chosen_rewards=zeros,
        rejected_rewards=zeros,
        tie_tolerance=zeros,
    )
    assert out.loss.item() == pytest.approx(1.934527, abs=1e-6)  # log(1 + e^1.778466)
    assert out.margins.item() == pytest.approx(-1.778466, abs=1e-6)
    assert out.chosen_shaping.item() == pytest.approx(-2.471613, abs=1e-6)
    out.loss.backward()
    without, no_entropy = _release_example(0.0)
    release_loss(no_entropy[:1], no_entropy[1:], chosen_rewards=zeros, rejected_rewards=zeros,
                 tie_tolerance=zeros).loss.backward()  # fmt: skip
    # The entropy of chosen t1 is not detached: with γ = 1 it moves t1's logits differently.
    assert not torch.allclose(logits.grad[1], without.grad[1], atol=1e-4)
