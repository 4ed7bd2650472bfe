"""What a student worker saves and restores: Ray Train checkpoints that let a resumed run go on
exactly where it stopped (SPEC §5), and the final Hugging Face model directory."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tvkd_ray.errors import CheckpointError

STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"  # inside the final model directory, with LoRA


@dataclass
class TrainState:
    """The counters a checkpoint carries besides the weights and optimiser."""

    step: int = 0
    epoch: int = 0
    num_tokens: int = 0
    mlflow_run_id: str | None = None


def save_checkpoint(
    directory: Path, weights: dict, optimizer_state: dict, state: TrainState, consumed
) -> None:
    """Weights (the trainable ones: actors.parallel), optimiser, RNG, counters and the pair ids
    of this epoch trained so far (``consumed``), so a resumed epoch skips exactly those (the
    learning rate follows from them: actors.trainer.LearningRate)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS_FILE))
    torch.save(optimizer_state, directory / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, directory / "rng.pt")
    np.save(directory / "consumed_pair_ids.npy", consumed)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state)))


@dataclass
class Restored:
    """What a checkpoint holds, read back (the weights are applied by actors.parallel)."""

    state: TrainState
    consumed: np.ndarray
    weights: dict
    optimizer_state: dict


def load_checkpoint(directory: Path, origin: str) -> Restored:
    """Read a checkpoint and restore the RNG; a damaged file gives a CheckpointError naming it
    in ``origin`` (the checkpoint's storage path; ``directory`` may be a local copy of it)."""
    from safetensors.torch import load_file

    current = None
    try:
        current = directory / STATE_FILE
        state = TrainState(**json.loads(current.read_text()))
        current = directory / WEIGHTS_FILE
        weights = load_file(str(current))
        current = directory / "optimizer.pt"
        optimizer_state = torch.load(current, weights_only=True)
        current = directory / "rng.pt"
        rng = torch.load(current, weights_only=True)
        current = directory / "consumed_pair_ids.npy"
        consumed = np.load(current, allow_pickle=False)
    except Exception as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"checkpoint file {Path(origin) / current.name} is corrupted or truncated ({reason}); "
            f"restore it, or start over by deleting {Path(origin).parent} or choosing a new "
            "run.name"
        ) from None
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    return Restored(state, consumed, weights, optimizer_state)


def save_hf_model(model, tokenizer, model_dir: Path, weights: dict | None = None) -> None:
    """Final model as a Hugging Face directory (safetensors) with its tokenizer, atomically;
    ``weights`` is the whole state dict when the model holds only a shard of it. With LoRA the
    adapters go to ``<model_dir>/adapter`` and the directory holds the merged model, which
    ``AutoModelForCausalLM`` loads as any other."""
    tmp = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):  # a PEFT model
        model.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        # A merged copy: the trainer's model keeps its adapters for the last checkpoint.
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
