"""Teacher actor: turns tokenised pairs into per-token value potentials Φ (SPEC §2.2).

Works as a Ray Data callable class (``map_batches(TeacherPotentials, compute=ActorPoolStrategy)``)
and as a plain actor (``ray.remote(TeacherPotentials).remote(...)`` then ``.__call__.remote``).
Only small arrays leave the actor: one float32 per response token (plus the top-k ids and
log-probs when KD is on), as Arrow list columns that travel zero-copy through the object store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow as pa
import torch

from actors.inference import FrozenModel, FrozenModelSpec, split_rows, with_timing
from tvkd_ray import alignment, schema
from tvkd_ray.potentials import (
    implicit_reward_potentials,
    soft_value_from_hidden,
    token_logps_from_hidden,
    topk_logps_from_hidden,
)


@dataclass(frozen=True)
class TeacherSpec(FrozenModelSpec):
    """The teacher actor's model, placement and potential settings (SPEC §2.2)."""

    potential: str = "soft_value"
    tau: float = 1.0
    q_scale: float = 1.0
    normalize: bool = False
    support_top_k: int = 0  # soft_value over the top-k plus a rest bucket; 0: the whole vocabulary
    ref_model: str | None = None  # the teacher's pre-DPO checkpoint, for implicit_reward
    beta: float = 0.1
    top_k: int = 0  # top-k ids and log-probs streamed per chosen token; 0 without KD or release
    rejected_top_k: bool = False  # the top-k ids per rejected token too (release)

    MODELS: ClassVar[tuple[str, ...]] = ("model", "ref_model")


class TeacherPotentials(FrozenModel):
    """Loads the teacher (and, for ``implicit_reward``, its pre-DPO reference) once per actor."""

    role = "teacher"

    def __init__(self, spec: TeacherSpec, board=None, stage: str = ""):
        super().__init__(spec, board, stage)
        self.soft_value_args = {
            "tau": spec.tau,
            "q_scale": spec.q_scale,
            "normalize": spec.normalize,
            "top_k": spec.support_top_k,
        }
        self.ref = self.load(spec.ref_model) if spec.potential == "implicit_reward" else None

    @torch.inference_mode()
    def annotate(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        with self.precision():
            if schema.CHOSEN_STATE_CHARS in table.column_names:
                out = self._mapped(table)
            else:
                out = self._scored(table)
        return with_timing(out, schema.TEACHER_S, started)

    def _mapped(self, table: pa.Table) -> pa.Table:
        """A student with another tokenizer (SPEC §2.3c): score the text the student kept with
        the teacher's own tokens, then take each student state's potential from the teacher's
        states; the text and the positions stay here."""
        own, teacher_chars = alignment.teacher_tokens(table, self.tokenizer)
        scored = self._scored(own)
        out = table.drop_columns(schema.ALIGNMENT.names)
        for (_, chars), column in zip(alignment.RESPONSE_COLUMNS, schema.POTENTIALS):
            phi = alignment.map_potentials(scored[column], teacher_chars[chars], table[chars])
            out = out.append_column(column, phi)
        return out

    def _scored(self, table: pa.Table) -> pa.Table:
        batch, hidden, head = self.score(table)
        mask = batch.response_mask
        if self.spec.potential == "soft_value":
            phi = soft_value_from_hidden(hidden, head, **self.soft_value_args)
        else:
            phi = self._implicit_reward(batch, hidden, head)
        chosen, rejected = split_rows(phi.float().cpu().numpy(), mask, table.num_rows)
        out = table.append_column(schema.CHOSEN_POTENTIALS, chosen)
        out = out.append_column(schema.REJECTED_POTENTIALS, rejected)
        if self.spec.top_k > 0:
            out = self._append_topk(out, hidden, head, batch.sides(mask))
        return out

    def _append_topk(self, out: pa.Table, hidden, head, masks) -> pa.Table:
        """KD needs the chosen responses only (their positions come first in ``hidden``);
        release needs the rejected ones' ids too."""
        k, n_chosen = self.spec.top_k, int(masks.chosen.sum())
        rows = hidden if self.spec.rejected_top_k else hidden[:n_chosen]
        ids, logps = topk_logps_from_hidden(rows, head, k)
        ids = ids.cpu().numpy().astype(np.int32)
        chosen_ids = _per_row(ids[:n_chosen], masks.chosen, k)
        out = out.append_column(schema.CHOSEN_TOPK_IDS, chosen_ids)
        logps = _per_row(logps[:n_chosen].float().cpu().numpy(), masks.chosen, k)
        out = out.append_column(schema.CHOSEN_TOPK_LOGPS, logps)
        if self.spec.rejected_top_k:
            rejected = _per_row(ids[n_chosen:], masks.rejected, k)
            out = out.append_column(schema.REJECTED_TOPK_IDS, rejected)
        return out

    def _implicit_reward(self, batch, hidden, head) -> torch.Tensor:
        """β_T · Σ_{k<t} [log π_T − log π_Tref] over each row's response tokens, flattened."""
        mask = batch.response_mask
        targets = batch.input_ids[mask]
        teacher = token_logps_from_hidden(hidden, head, targets)
        ref_hidden = self.hidden(self.ref, batch)
        ref = token_logps_from_hidden(ref_hidden, self.ref.get_output_embeddings(), targets)
        mask = mask.to(teacher.device)  # the head's device, where a device_map puts it
        padded_t = torch.zeros(mask.shape, dtype=torch.float32, device=teacher.device)
        padded_r = torch.zeros_like(padded_t)
        padded_t[mask] = teacher.float()
        padded_r[mask] = ref.float().to(teacher.device)
        return implicit_reward_potentials(padded_t, padded_r, mask, self.spec.beta)[mask]


def _per_row(values: np.ndarray, mask: torch.Tensor, k: int) -> pa.ListArray:
    """``[tokens, k]`` values of one side, flat, as one list per row (k per response token)."""
    lengths = mask.sum(dim=1).cpu().numpy() * k
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.ravel()))
