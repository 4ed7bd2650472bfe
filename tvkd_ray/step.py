"""The student's training step: one forward over a batch of scored pairs, the configured
objective (SPEC §2.3) and the batch's metric sums. The Ray Train workers and the benchmarks' bare
loop both run it, so a benchmark ratio measures the plumbing around it, not a second copy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tvkd_ray import schema
from tvkd_ray.config import TVKDConfig
from tvkd_ray.data import PairBatch, collate
from tvkd_ray.forward import autocast, row_sums
from tvkd_ray.loss import (
    bc_loss,
    kd_loss,
    preference_metrics,
    release_loss,
    release_returns,
    tie_tolerance,
    tvkd_loss,
)


@dataclass(frozen=True)
class Objective:
    """What the student minimises, resolved once from the config."""

    stage: str
    kind: str  # loss.objective: tvkd (DPO + shaping) or release (the released recipe)
    beta: float
    alpha: float  # 0 unless teacher actors run (run.stage dpo is plain DPO)
    gamma: float
    label_smoothing: float
    center: bool
    bc_weight: float
    kd_weight: float
    top_k: int  # teacher top-k ids per response token (chosen for KD, both for release), or 0

    @classmethod
    def from_config(cls, cfg: TVKDConfig) -> Objective:
        loss = cfg.loss
        return cls(
            stage=cfg.run.stage,
            kind=loss.objective,  # release is validated to come with run.stage tvkd
            beta=loss.beta,
            alpha=loss.alpha if cfg.uses_teacher else 0.0,
            gamma=loss.gamma,
            label_smoothing=loss.label_smoothing,
            center=loss.center_potentials,
            bc_weight=loss.bc_weight,
            kd_weight=loss.kd_weight,
            top_k=cfg.teacher.top_k if cfg.uses_top_k else 0,
        )


def apply_gradients(model: torch.nn.Module, optimizer, max_grad_norm: float) -> float:
    """Clip (unless ``max_grad_norm`` is 0) and take the optimiser step; the gradient norm."""
    grad_norm = 0.0
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        # Sharded (FSDP) gradients give a DTensor norm: the whole model's, once gathered.
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    return grad_norm


def _per_position(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Flat per-token values back at their ``[rows, positions]`` places (0 elsewhere)."""
    out = torch.zeros(response_mask.shape, dtype=values.dtype, device=values.device)
    out[response_mask] = values
    return out


class StudentStep:
    """Loss of one batch of scored pairs under the objective, plus metric sums over its pairs."""

    def __init__(
        self,
        objective: Objective,
        policy: torch.nn.Module,
        pad_id: int,
        device,
        autocast_to: str | None = None,
    ):
        self.objective = objective
        self.policy = policy  # a ResponseLogps, possibly DDP-wrapped
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.autocast_to = autocast_to  # resolved student.autocast (forward.autocast_dtype)

    def __call__(self, table: pa.Table) -> tuple[torch.Tensor, dict[str, float]]:
        """(mean loss over the table's pairs, metric sums over them; ``pairs`` among the sums)."""
        batch = collate(table, self.pad_id).to(self.device)
        if self.objective.stage == "sft":
            return self._sft(batch)
        o = self.objective
        topk_ids = self._topk_ids(table)
        logps, topk_logps = self._forward(
            batch.input_ids, batch.attention_mask, batch.response_mask, topk_ids
        )
        masks = batch.sides(batch.response_mask)
        policy = batch.sides(row_sums(logps, batch.response_mask))
        reference = batch.sides(batch.ref_logps)
        potentials = None if batch.potentials is None else batch.sides(batch.potentials)
        if o.kind == "release":
            out = self._release(batch, logps, topk_ids, topk_logps, policy, reference)
        else:
            out = tvkd_loss(
                policy_chosen_logps=policy.chosen,
                policy_rejected_logps=policy.rejected,
                ref_chosen_logps=reference.chosen,
                ref_rejected_logps=reference.rejected,
                chosen_potentials=None if potentials is None else potentials.chosen,
                rejected_potentials=None if potentials is None else potentials.rejected,
                chosen_mask=masks.chosen,
                rejected_mask=masks.rejected,
                beta=o.beta,
                alpha=o.alpha,
                gamma=o.gamma,
                label_smoothing=o.label_smoothing,
                center=o.center,
            )
        loss = out.loss
        if o.bc_weight > 0:
            per_token = batch.sides(_per_position(logps, batch.response_mask)).chosen
            loss = loss + o.bc_weight * bc_loss(per_token, masks.chosen)
        if o.kd_weight > 0:
            teacher = self._teacher_topk(table, schema.CHOSEN_TOPK_LOGPS)
            loss = loss + o.kd_weight * kd_loss(topk_logps[: teacher.shape[0]], teacher)
        metrics = preference_metrics(out, policy_logps=policy, potentials=potentials, masks=masks)
        metrics["loss"] = loss.item()
        sums = self._counts(table, batch, teacher_payload=potentials is not None)
        sums.update({k: v * batch.n_pairs for k, v in metrics.items()})
        return loss, sums

    def _forward(self, input_ids, attention_mask, response_mask, topk_ids=None):
        # The reference actors run the same numerics (weights dtype and autocast).
        with autocast(self.autocast_to, self.device.type):
            return self.policy(input_ids, attention_mask, response_mask, topk_ids)

    def _sft(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Behaviour cloning on the chosen rows only (the rejected half is never run)."""
        rows = (batch.input_ids, batch.attention_mask, batch.response_mask)
        input_ids, attention_mask, mask = (batch.sides(t).chosen for t in rows)
        logps, _ = self._forward(input_ids, attention_mask, mask)
        loss = bc_loss(_per_position(logps, mask), mask)
        n = batch.n_pairs
        return loss, {
            "pairs": n,
            "tokens": int(attention_mask.sum()),
            "response_tokens": int(mask.sum()),
            "loss": loss.item() * n,
            "logps/chosen": row_sums(logps, mask).detach().sum().item(),
        }

    def _topk_ids(self, table: pa.Table) -> torch.Tensor | None:
        """The teacher's top-k ids the student is scored at: ``[chosen tokens, k]`` for KD, and
        ``[response tokens, k]`` (chosen rows first, as in the batch) for release."""
        if not self.objective.top_k:
            return None
        chosen = self._teacher_topk(table, schema.CHOSEN_TOPK_IDS)
        if self.objective.kind != "release":
            return chosen
        return torch.cat([chosen, self._teacher_topk(table, schema.REJECTED_TOPK_IDS)])

    def _release(self, batch, logps, topk_ids, topk_logps, policy, reference):
        """The released recipe's loss on this batch (``tvkd_ray.loss.release_returns``)."""
        o, mask = self.objective, batch.response_mask
        targets = batch.input_ids[mask]
        rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        in_topk = (topk_ids == targets[:, None]).any(dim=-1)
        returns = batch.sides(
            release_returns(logps, topk_logps, in_topk, rows, mask.shape[0], gamma=o.gamma)
        )
        return release_loss(
            returns.chosen,
            returns.rejected,
            chosen_rewards=o.beta * (policy.chosen - reference.chosen),
            rejected_rewards=o.beta * (policy.rejected - reference.rejected),
            tie_tolerance=tie_tolerance(
                o.beta, policy.chosen, policy.rejected, reference.chosen, reference.rejected
            ),
            label_smoothing=o.label_smoothing,
        )

    def _teacher_topk(self, table: pa.Table, column: str) -> torch.Tensor:
        """A teacher top-k column as ``[that side's response tokens, k]``."""
        flat = np.concatenate(table.column(column).to_numpy(zero_copy_only=False))
        values = flat if column == schema.CHOSEN_TOPK_LOGPS else flat.astype(np.int64)
        return torch.from_numpy(values.reshape(-1, self.objective.top_k)).to(self.device)

    @staticmethod
    def _counts(table: pa.Table, batch: PairBatch, teacher_payload: bool) -> dict[str, float]:
        """Sums that are counts, not means: pairs, tokens, teacher bytes, actor seconds."""
        sums = {
            "pairs": batch.n_pairs,
            "tokens": int(batch.attention_mask.sum()),
            "response_tokens": int(batch.response_mask.sum()),
        }
        if teacher_payload:
            payload = [
                table.column(c).nbytes for c in schema.TEACHER_PAYLOAD if c in table.schema.names
            ]
            sums["payload_bytes"] = sum(payload)
        for timing in schema.TIMINGS:
            if timing in table.column_names:
                sums[timing] = float(pc.sum(table.column(timing)).as_py())
        return sums
