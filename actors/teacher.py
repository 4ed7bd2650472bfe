"""Teacher actor: turns tokenised pairs into per-token value potentials Φ (SPEC §2.2).

Works as a Ray Data callable class (``map_batches(TeacherPotentials, compute=ActorPoolStrategy)``)
and as a plain actor (``ray.remote(TeacherPotentials).remote(...)`` then ``.__call__.remote``).
Only small arrays leave the actor: one float32 per response token (plus the top-k ids and
log-probs when KD is on), as Arrow list columns that travel zero-copy through the object store.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import torch

from actors.inference import FrozenModel, split_rows, with_timing
from tvkd_ray.forward import lm_head_params
from tvkd_ray.potentials import (
    implicit_reward_potentials,
    soft_value_from_hidden,
    token_logps_from_hidden,
    topk_logps_from_hidden,
)


class TeacherPotentials(FrozenModel):
    """Loads the teacher (and, for ``implicit_reward``, its pre-DPO reference) once per actor."""

    role = "teacher"

    def __init__(
        self,
        model: str,
        *,
        potential: str = "soft_value",
        tau: float = 1.0,
        q_scale: float = 1.0,
        normalize: bool = False,
        ref_model: str | None = None,
        beta: float = 0.1,
        top_k: int = 0,
        dtype: str = "auto",
        num_gpus: float = 0.0,
        num_threads: int | None = None,
        idle_priority: bool = False,
        trust_remote_code: bool = False,
    ):
        super().__init__(
            model,
            dtype=dtype,
            num_gpus=num_gpus,
            num_threads=num_threads,
            idle_priority=idle_priority,
            trust_remote_code=trust_remote_code,
        )
        self.potential = potential
        self.soft_value_args = {"tau": tau, "q_scale": q_scale, "normalize": normalize}
        self.beta = beta
        self.top_k = top_k
        self.ref = None
        if potential == "implicit_reward":
            self.ref = self.load(ref_model, trust_remote_code)

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        batch, hidden, weight, bias = self.score(table)
        mask = batch["response_mask"]
        if self.potential == "soft_value":
            phi = soft_value_from_hidden(hidden, weight, bias, **self.soft_value_args)
        else:
            phi = self._implicit_reward(batch, hidden, weight, bias)
        chosen, rejected = split_rows(phi.float().cpu().numpy(), mask, table.num_rows)
        out = table.append_column("chosen_potentials", chosen)
        out = out.append_column("rejected_potentials", rejected)
        if self.top_k > 0:
            # KD needs the chosen responses only: they are the first rows of the batch.
            n_chosen = int(mask[: table.num_rows].sum())
            ids, logps = topk_logps_from_hidden(hidden[:n_chosen], weight, self.top_k, bias)
            lengths = mask[: table.num_rows].sum(dim=1).cpu().numpy() * self.top_k
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
            out = out.append_column(
                "chosen_topk_ids",
                pa.ListArray.from_arrays(
                    offsets, pa.array(ids.cpu().numpy().ravel().astype(np.int32))
                ),
            )
            out = out.append_column(
                "chosen_topk_logps",
                pa.ListArray.from_arrays(offsets, pa.array(logps.float().cpu().numpy().ravel())),
            )
        return with_timing(out, "teacher_s", started)

    def _implicit_reward(self, batch, hidden, weight, bias) -> torch.Tensor:
        """β_T · Σ_{k<t} [log π_T − log π_Tref] over each row's response tokens, flattened."""
        mask = batch["response_mask"]
        targets = batch["input_ids"][mask]
        teacher = token_logps_from_hidden(hidden, weight, targets, bias)
        ref_hidden = self.hidden(self.ref, batch)
        ref_weight, ref_bias = lm_head_params(self.ref)
        ref = token_logps_from_hidden(
            ref_hidden, ref_weight, targets.to(ref_hidden.device), ref_bias
        )
        padded_t = torch.zeros(mask.shape, dtype=torch.float32, device=teacher.device)
        padded_r = torch.zeros_like(padded_t)
        padded_t[mask] = teacher.float()
        padded_r[mask] = ref.float().to(teacher.device)
        return implicit_reward_potentials(padded_t, padded_r, mask, self.beta)[mask]
