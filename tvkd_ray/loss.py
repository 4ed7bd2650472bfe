"""The TVKD objective (SPEC §2.3): DPO plus potential-based shaping, and the optional terms.

Shapes: B pairs, T positions. Masks are bool ``[B, T]`` and mark response tokens; they may start
mid-row (left padding) and need not be contiguous. Values at unmasked positions are ignored.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tvkd_ray.potentials import with_rest_bucket

# A margin within TIE_RTOL · β · (|log π_θ(y⁺)| + |log π_θ(y⁻)| + |log π_ref(y⁺)| + |log π_ref(y⁻)|)
# of 0 is a tie, never a win: equal models scoring the same pair in batches of other shapes
# differ by float rounding, measured at ≤ 6.4e-8 of that sum on CPU (docs/RELIABILITY.md);
# 1e-6 is about two float32 ulps of it.
TIE_RTOL = 1e-6


def tie_tolerance(beta: float, *sequence_logps: torch.Tensor) -> torch.Tensor:
    """Per pair, the |margin| at or below which a margin is a tie: ``TIE_RTOL · β · Σ |log-prob|``
    over the pair's sequence log-probs (policy and, where there is one, reference; ``[B]`` each)."""
    return TIE_RTOL * beta * sum(logps.detach().abs() for logps in sequence_logps)


@dataclass
class TVKDLossOutput:
    """Result of ``tvkd_loss``: the differentiable loss and detached per-pair diagnostics ([B])."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_shaping: torch.Tensor
    rejected_shaping: torch.Tensor
    margins: torch.Tensor
    tie_tolerance: torch.Tensor  # |margin| at or below it is a tie (TIE_RTOL)

    def wins(self, margins: torch.Tensor) -> torch.Tensor:
        """Pairs whose ``margins`` prefer the chosen response beyond float rounding, ``[B]``."""
        return margins > self.tie_tolerance


def shaping_return(
    potentials: torch.Tensor, mask: torch.Tensor, gamma: float, center: bool = False
) -> torch.Tensor:
    """Shaping return S(y) = Σ_t m_t · (γ · Φ(next masked position) − Φ(t)) per row, ``[B]``.

    Φ after the last masked position (terminal) is 0; rows without masked positions give 0.
    ``center`` subtracts each row's first masked potential Φ(s_1) from all its potentials first.
    """
    phi = torch.where(mask, potentials.float(), 0.0)
    # argmax returns the first maximum, i.e. the first masked position (0 for an empty row,
    # where phi is 0 anyway).
    first = phi.gather(-1, mask.long().argmax(dim=-1, keepdim=True)).squeeze(-1)
    total = phi.sum(dim=-1)
    if center:
        total = total - mask.sum(dim=-1) * first
        first = torch.zeros_like(first)
    # The sum telescopes (SPEC §2.3): every masked Φ but the first is reached once as "next".
    return -gamma * first - (1.0 - gamma) * total


def tvkd_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_potentials: torch.Tensor | None,
    rejected_potentials: torch.Tensor | None,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    gamma: float,
    label_smoothing: float = 0.0,
    center: bool = False,
) -> TVKDLossOutput:
    """TVKD preference loss on ``[B]`` sequence log-probs and ``[B, T]`` teacher potentials.

    h(y) = β · (log π_θ − log π_ref) + α · S(y), Δ = h(y⁺) − h(y⁻) and
    L = mean(−(1−ε) · log σ(Δ) − ε · log σ(−Δ)). Only the policy log-probs get gradients.
    With ``alpha == 0`` this is DPO's sigmoid loss and the potentials may be None.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    if alpha == 0:
        chosen_shaping = torch.zeros_like(chosen_rewards)
        rejected_shaping = torch.zeros_like(rejected_rewards)
    else:
        chosen_shaping = alpha * shaping_return(
            chosen_potentials.detach(), chosen_mask, gamma, center
        )
        rejected_shaping = alpha * shaping_return(
            rejected_potentials.detach(), rejected_mask, gamma, center
        )
    margins = (chosen_rewards + chosen_shaping) - (rejected_rewards + rejected_shaping)
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(margins) - eps * F.logsigmoid(-margins)
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return TVKDLossOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_shaping=chosen_shaping,
        rejected_shaping=rejected_shaping,
        margins=margins.detach(),
        tie_tolerance=tie_tolerance(beta, *logps),
    )


def release_returns(
    token_logps: torch.Tensor,
    topk_logps: torch.Tensor,
    in_topk: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    *,
    gamma: float,
) -> torch.Tensor:
    """The released TVKD recipe's return R(y) = Σ_t [log q̂_θ(y_t|s_t) − γ · H(q̂_θ(·|s_{t+1}))]
    per row, ``[n_rows]``, differentiable (the entropy too).

    q̂_θ(·|s) is the student's distribution collapsed onto the teacher's top-k ids at s plus one
    rest bucket; a response token outside the teacher's top-k takes the rest bucket's log-prob.
    The entropy is of the next response state in the same row; after a row's last token (the
    terminal state) it is 0. Inputs are flat over the response tokens, row-major: the student's
    log-prob of each token ``[N]``, its log-probs of the teacher's top-k ids there ``[N, k]``,
    whether the token is one of them ``[N]`` and the token's row ``[N]``.
    """
    collapsed = with_rest_bucket(topk_logps.float())
    log_q = torch.where(in_topk, token_logps.float(), collapsed[:, -1])
    entropy = -(collapsed.exp() * collapsed).sum(dim=-1)
    same_row = rows[1:] == rows[:-1]
    next_entropy = F.pad(torch.where(same_row, entropy[1:], 0.0), (0, 1))
    per_token = log_q - gamma * next_entropy
    return torch.zeros(n_rows, dtype=per_token.dtype, device=per_token.device).index_add(
        0, rows, per_token
    )


def release_loss(
    chosen_returns: torch.Tensor,
    rejected_returns: torch.Tensor,
    *,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    tie_tolerance: torch.Tensor,
    label_smoothing: float = 0.0,
) -> TVKDLossOutput:
    """−log σ(R⁺ − R⁻) of the released recipe on ``[B]`` returns (reference-free, no β).

    ``chosen_rewards``/``rejected_rewards`` (β-scaled policy/reference log-ratios) are only
    reported, so that runs of both objectives share one held-out accuracy; the returns go in
    the ``*_shaping`` fields and their difference is the loss's margin.
    """
    margins = chosen_returns - rejected_returns
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(margins) - eps * F.logsigmoid(-margins)
    return TVKDLossOutput(
        loss=losses.mean(),
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        chosen_shaping=chosen_returns.detach(),
        rejected_shaping=rejected_returns.detach(),
        margins=margins.detach(),
        tie_tolerance=tie_tolerance,
    )


def bc_loss(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Behaviour cloning: mean negative log-prob over the masked tokens (0 if none)."""
    total = torch.where(mask, token_logps, 0.0).sum()
    return -total / mask.sum().clamp(min=1)


def kd_loss(
    student_topk_logps: torch.Tensor,
    teacher_topk_logps: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(π_T ‖ π_θ) over the teacher's top-k tokens plus one "rest" bucket.

    Both log-prob tensors are ``[..., k]`` at the same token ids (the teacher's top-k); the KL is
    averaged over the positions ``[...]``, or over those where ``mask`` is true (0 if none).
    Only the student gets gradients.
    """
    teacher = with_rest_bucket(teacher_topk_logps.detach().float())
    student = with_rest_bucket(student_topk_logps.float())
    kl = (teacher.exp() * (teacher - student)).sum(dim=-1)
    if mask is None:
        return kl.mean()
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class Sides:
    """One tensor for the chosen and one for the rejected responses of the same B pairs."""

    chosen: torch.Tensor
    rejected: torch.Tensor

    @classmethod
    def split(cls, rows: torch.Tensor, n_pairs: int) -> "Sides":
        """The two halves of a 2B-row tensor whose chosen rows come first."""
        return cls(rows[:n_pairs], rows[n_pairs:])


def preference_metrics(
    out: TVKDLossOutput,
    *,
    policy_logps: Sides,
    potentials: Sides | None = None,
    masks: Sides | None = None,
) -> dict[str, float]:
    """SPEC §2.5 metrics of one batch as python floats (means over its pairs).

    ``tvkd/potential_mean`` (mean raw Φ over the masked positions of both sides) is present only
    when ``potentials`` and their ``masks`` are given.
    """
    metrics = {
        "loss": out.loss.item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "rewards/accuracies": out.wins(out.chosen_rewards - out.rejected_rewards)
        .float()
        .mean()
        .item(),
        "logps/chosen": policy_logps.chosen.detach().mean().item(),
        "logps/rejected": policy_logps.rejected.detach().mean().item(),
        "tvkd/shaping_chosen": out.chosen_shaping.mean().item(),
        "tvkd/shaping_rejected": out.rejected_shaping.mean().item(),
        "tvkd/shaped_margins": out.margins.mean().item(),
        "tvkd/shaped_accuracies": out.wins(out.margins).float().mean().item(),
    }
    if potentials is not None and masks is not None:
        sides = ((potentials.chosen, masks.chosen), (potentials.rejected, masks.rejected))
        total = sum(torch.where(mask, phi.float(), 0.0).sum() for phi, mask in sides)
        count = masks.chosen.sum() + masks.rejected.sum()
        metrics["tvkd/potential_mean"] = (total / count.clamp(min=1)).item()
    return metrics
