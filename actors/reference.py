"""Reference actor: the student's frozen reference π_ref scores each response once, so no trainer
ever holds a second model. Adds ``ref_chosen_logps`` / ``ref_rejected_logps`` (float32 per pair).
Works as a Ray Data callable class and as a plain actor, like the teacher."""

from __future__ import annotations

import time

import pyarrow as pa
import torch

from actors.inference import FrozenModel, with_timing
from tvkd_ray.forward import row_sums
from tvkd_ray.potentials import token_logps_from_hidden


class ReferenceLogps(FrozenModel):
    role = "reference"

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        batch, hidden, weight, bias = self.score(table)
        mask = batch["response_mask"]
        logps = token_logps_from_hidden(hidden, weight, batch["input_ids"][mask], bias)
        sums = row_sums(logps.double(), mask).float().cpu().numpy()
        n = table.num_rows
        out = table.append_column("ref_chosen_logps", pa.array(sums[:n]))
        out = out.append_column("ref_rejected_logps", pa.array(sums[n:]))
        return with_timing(out, "reference_s", started)
