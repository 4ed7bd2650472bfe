"""One forward pass over a collated 2B-row batch, scoring only the response tokens.

The LM head runs on the hidden states of the positions that predict a response token, not on the
whole sequence: prompts and padding never reach the (vocab-sized) head. The teacher, the reference
and the student all share this path, so their log-probs line up token for token.
"""

from __future__ import annotations

import torch
from torch import nn

from tvkd_ray.potentials import token_logps


def predicting_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """Mask of the positions whose next-token prediction is a response token (SPEC §2.2)."""
    predicting = torch.zeros_like(response_mask)
    predicting[:, :-1] = response_mask[:, 1:]
    return predicting


def response_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask
) -> torch.Tensor:
    """Final hidden states [N, H] of the N positions that predict response tokens, row-major."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    return hidden[predicting_positions(response_mask)]


def row_sums(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sum flat per-token values [N] (row-major over ``response_mask``) into float32 per-row
    totals, accumulated in float64: the student's and the reference's sums of equal token
    log-probs then agree to the bit, whatever order the values arrive in."""
    rows = response_mask.nonzero(as_tuple=True)[0]
    totals = torch.zeros(response_mask.shape[0], dtype=torch.float64, device=values.device)
    return totals.index_add(0, rows, values.double()).float()


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_dtype(setting: str, device_type: str) -> str | None:
    """The dtype a forward autocasts to: ``auto`` is bfloat16 on CUDA and none on CPU."""
    if setting == "auto":
        return "bfloat16" if device_type == "cuda" else None
    return None if setting == "none" else setting


def autocast(dtype: str | None, device_type: str):
    """The autocast context of a resolved ``autocast_dtype`` (a no-op for None)."""
    enabled = dtype is not None
    return torch.autocast(
        device_type, dtype=AUTOCAST_DTYPES.get(dtype, torch.bfloat16), enabled=enabled
    )


class ResponseLogps(nn.Module):
    """Wraps a causal LM so that DDP sees one forward returning per-token response log-probs.

    ``forward`` returns ``(logps [N], topk_logps [N_c, k] | None)``: the log-prob of every response
    token (row-major over ``response_mask``) and, for KD, the log-probs of the teacher's top-k ids
    at the first ``N_c`` positions (the chosen rows, which come first in the batch).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, response_mask, topk_ids=None):
        hidden = response_hidden(self.model, input_ids, attention_mask, response_mask)
        # The head module itself, so an adapted (LoRA) or sharded (FSDP) head computes as such.
        logits = self.model.get_output_embeddings()(hidden).float()
        # Clones, not views: FSDP2 hooks the module's outputs and refuses views (N floats each).
        logps = token_logps(logits, input_ids[response_mask]).clone()
        topk_logps = None
        if topk_ids is not None:
            topk_logps = token_logps(logits[: topk_ids.shape[0]], topk_ids).clone()
        return logps, topk_logps
