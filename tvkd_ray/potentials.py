"""Teacher potentials Φ (SPEC §2.2) and memory-aware log-prob helpers.

Everything here reduces over the vocabulary in float32. The ``*_from_hidden`` helpers take the
final hidden states of the positions that matter plus the LM-head module and compute the logits
chunk by chunk, so no ``[N, V]`` float32 tensor is ever held: peak extra memory is a few chunks.
The head is called as a module, never read as a weight: accelerate's hooks then fetch offloaded
weights and move the hidden states to the head's device, and adapted or quantised heads compute
as they should.

``chunk_size`` is a number of rows (positions) per chunk. ``None`` picks as many rows as fit in
``DEFAULT_CHUNK_BYTES`` of float32 logits (at least one), e.g. 524 rows for a 32k vocabulary and
131 rows for a 128k one; large enough to keep a GPU busy, small next to a model's activations.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHUNK_BYTES = 64 * 2**20
# Floor of a "rest" bucket's probability: 1 − Σ top-k can round to ≤ 0 in float32.
MIN_REST_PROB = 1e-6


def soft_value(
    logits: torch.Tensor,
    tau: float = 1.0,
    q_scale: float = 1.0,
    normalize: bool = False,
    top_k: int = 0,
) -> torch.Tensor:
    """Soft value Φ = τ · logsumexp(q · z̃ / τ) over the last axis, in float32.

    z̃ is the raw logits, or ``log_softmax(logits)`` when ``normalize`` is true. ``top_k > 0``
    (with ``normalize``) sums over the k most likely tokens plus one "rest" bucket holding the
    remaining probability, as the TVKD authors' code does: Φ = τ · log(Σ_topk π^(q/τ) + rest^(q/τ)).
    """
    z = logits.float()
    if normalize:
        z = torch.log_softmax(z, dim=-1)
    if top_k > 0:
        z = with_rest_bucket(z.topk(top_k, dim=-1).values)
    return tau * torch.logsumexp(z * (q_scale / tau), dim=-1)


def with_rest_bucket(topk_logps: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` log-probs → ``[..., k + 1]``: one more bucket with the probability the k do
    not hold, log(1 − Σ exp(topk)), floored at ``MIN_REST_PROB`` (rounding can make it 0)."""
    rest = -torch.expm1(topk_logps.logsumexp(dim=-1, keepdim=True))
    return torch.cat([topk_logps, rest.clamp(min=MIN_REST_PROB).log()], dim=-1)


def soft_value_from_hidden(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    *,
    tau: float = 1.0,
    q_scale: float = 1.0,
    normalize: bool = False,
    top_k: int = 0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``soft_value`` of the logits of ``hidden [N, H]``, chunked over N: ``[N]`` float32."""
    return torch.cat(
        [
            soft_value(logits, tau=tau, q_scale=q_scale, normalize=normalize, top_k=top_k)
            for logits in _logit_chunks(hidden, lm_head, chunk_size)
        ]
    )


def token_logps(
    logits: torch.Tensor, ids: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Float32 log-probs of ``ids`` under ``logits [..., V]``, without a full log_softmax copy.

    ``ids`` is ``[...]`` (one token per position) or ``[..., k]`` (k tokens per position, e.g. the
    teacher's top-k). Differentiable. The leading dims are flattened, which copies a sliced view
    such as ``logits[:, :-1]``: pass full-length logits with next-token ids instead.
    """
    per_position = ids.dim() == logits.dim() - 1
    ids_k = ids.unsqueeze(-1) if per_position else ids
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_ids = ids_k.reshape(flat_logits.shape[0], -1)
    rows = _rows_per_chunk(logits.shape[-1], chunk_size)
    out = torch.cat(
        [
            _gather_logps(chunk.float(), chunk_ids)
            for chunk, chunk_ids in zip(flat_logits.split(rows), flat_ids.split(rows))
        ]
    ).reshape(ids_k.shape)
    return out.squeeze(-1) if per_position else out


def token_logps_from_hidden(
    hidden: torch.Tensor, lm_head: nn.Module, ids: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Float32 log-probs of ``ids [N]`` or ``[N, k]`` given ``hidden [N, H]``, chunked over N."""
    per_position = ids.dim() == 1
    ids_k = ids.unsqueeze(-1) if per_position else ids
    rows = _rows_per_chunk(vocab_size(lm_head), chunk_size)
    out = torch.cat(
        [
            _gather_logps(logits, chunk_ids.to(logits.device))
            for logits, chunk_ids in zip(_logit_chunks(hidden, lm_head, rows), ids_k.split(rows))
        ]
    )
    return out.squeeze(-1) if per_position else out


def topk_logps_from_hidden(
    hidden: torch.Tensor, lm_head: nn.Module, k: int, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens of each row of ``hidden [N, H]``.

    Returns ``(ids int64 [N, k], logps float32 [N, k])``, highest first, chunked over N.
    """
    ids, logps = [], []
    for logits in _logit_chunks(hidden, lm_head, chunk_size):
        top = logits.topk(k, dim=-1)
        ids.append(top.indices)
        logps.append(top.values - logits.logsumexp(dim=-1, keepdim=True))
    return torch.cat(ids), torch.cat(logps)


def implicit_reward_potentials(
    teacher_logps: torch.Tensor,
    teacher_ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO teacher's implicit value of each response prefix, ``[B, T]`` float32.

    Φ(s_t) = β · Σ_{k<t} [log π_T(y_k|s_k) − log π_Tref(y_k|s_k)] over the masked positions of the
    row, so the first masked position gets 0; unmasked positions get 0 and their inputs are ignored.
    """
    ratio = torch.where(mask, teacher_logps.float() - teacher_ref_logps.float(), 0.0)
    # Exclusive cumulative sum: shift the inclusive one right by one position.
    before = F.pad(ratio.cumsum(dim=-1)[..., :-1], (1, 0))
    return torch.where(mask, beta * before, 0.0)


def _rows_per_chunk(vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab_size))


def vocab_size(lm_head: nn.Module) -> int:
    return lm_head.weight.shape[0]  # a meta (offloaded) or sharded weight still has its shape


def _logit_chunks(
    hidden: torch.Tensor, lm_head: nn.Module, chunk_size: int | None
) -> Iterator[torch.Tensor]:
    # The matmul runs in the model's dtype (as the LM head would); only the chunk is upcast, so
    # a bf16 weight is never copied to float32.
    for rows in hidden.split(_rows_per_chunk(vocab_size(lm_head), chunk_size)):
        yield lm_head(rows).float()


def _gather_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    # gather − logsumexp is log_softmax at the chosen ids without a [rows, V] output.
    return logits.gather(-1, ids.long()) - logits.logsumexp(dim=-1, keepdim=True)
