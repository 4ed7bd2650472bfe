"""Reference actor: the student's frozen reference π_ref scores each response once, so no trainer
ever holds a second model. Adds the ``schema.REFERENCE`` columns (sequence log-probs, float32 per
pair). Built from a ``FrozenModelSpec``; works as a Ray Data callable class and as a plain actor,
like the teacher."""

from __future__ import annotations

import time

import pyarrow as pa
import torch

from actors.inference import FrozenModel, with_timing
from tvkd_ray import schema
from tvkd_ray.forward import row_sums
from tvkd_ray.potentials import token_logps_from_hidden


class ReferenceLogps(FrozenModel):
    role = "reference"

    @torch.inference_mode()
    def annotate(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        with self.precision():
            batch, hidden, head = self.score(table)
            mask = batch.response_mask
            logps = token_logps_from_hidden(hidden, head, batch.input_ids[mask])
        sums = batch.sides(row_sums(logps, mask.to(logps.device)).cpu())
        out = table.append_column(schema.REF_CHOSEN_LOGPS, pa.array(sums.chosen.numpy()))
        out = out.append_column(schema.REF_REJECTED_LOGPS, pa.array(sums.rejected.numpy()))
        return with_timing(out, schema.REFERENCE_S, started)
