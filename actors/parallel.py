"""How the student's weights live on the workers: replicated (``train.strategy: ddp``; one worker
holds the model as is) or sharded (``fsdp``: torch FSDP2, one unit per decoder layer and one for
the rest). The trainer asks one of these to wrap the model, to switch gradient sync on and off,
and to gather or restore whole state dicts, so checkpoints and the final model have one format
whatever the strategy."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tvkd_ray.errors import CheckpointError


class Replicated:
    """Every worker holds the whole model; DDP averages the gradients over workers."""

    gathers = False  # whether every worker must call state_dicts and full_weights

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    def wrap(self, policy: nn.Module) -> nn.Module:
        if self.world == 1:
            return policy.to(self.device)
        import ray.train.torch

        return ray.train.torch.prepare_model(policy)

    def gradient_sync(self, policy: nn.Module, enabled: bool):
        """The context of one micro-batch's backward: with ``enabled`` false (every
        micro-batch of a step but the last) gradients accumulate locally, unsynchronised."""
        ddp = isinstance(policy, nn.parallel.DistributedDataParallel)
        return contextlib.nullcontext() if enabled or not ddp else policy.no_sync()

    def state_dicts(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """(weights, optimiser state) as a checkpoint holds them: the trainable parameters only
        (a LoRA checkpoint holds the adapters, not the frozen base), on the CPU."""
        weights = {
            name: param.detach().cpu()
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        return weights, optimizer.state_dict()

    def load_state_dicts(self, model: nn.Module, optimizer, weights: dict, optim: dict) -> None:
        _check_covers(model, weights)
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optim)

    def full_weights(self, model: nn.Module) -> dict | None:
        """The whole model's state dict for ``save_pretrained``; None: the model's own."""
        return None


class Sharded(Replicated):
    """FSDP2: each worker holds a shard of every weight, gradient and optimiser state, and
    gathers a layer's weights only while it runs. Every worker must join every forward, which
    actors.lockstep guarantees (placeholder batches)."""

    gathers = True

    def wrap(self, policy: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import fully_shard

        policy.to(self.device)
        # The model's own no-split blocks (its decoder layers), as accelerate and HF use them.
        blocks = set(getattr(policy.model, "_no_split_modules", None) or [])
        for module in policy.model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        # The root unit holds embeddings, final norm and LM head; it is the wrapper, so the
        # wrapper's forward gathers them (ResponseLogps calls the decoder and head directly).
        fully_shard(policy)
        return policy

    def gradient_sync(self, policy: nn.Module, enabled: bool):
        policy.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def state_dicts(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """Gathered whole on every worker (a collective: all must call it), on the CPU."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = self.full_weights(model)
        names = {name for name, _ in model.named_parameters()}  # one name per tied weight
        weights = {name: value for name, value in weights.items() if name in names}
        optim = get_optimizer_state_dict(model, optimizer, options=_full_on_cpu())
        return weights, optim

    def load_state_dicts(self, model: nn.Module, optimizer, weights: dict, optim: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        _check_covers(model, weights)
        # strict=False: a tied weight is stored under one of its names (_check_covers).
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optim, options=options)

    def full_weights(self, model: nn.Module) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_on_cpu())


def _full_on_cpu():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _check_covers(model: nn.Module, weights: dict) -> None:
    """A checkpoint must hold every trainable weight of this student, and nothing else."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
    if missing or extra:
        shown = (missing or extra)[:3]
        what = "lacks" if missing else "has weights this student does not train:"
        raise CheckpointError(
            f"the checkpoint {what} {', '.join(shown)}: it was saved by another student "
            "set-up (student.lora, student.model); start over with a new run.name"
        )


def strategy_for(name: str, world: int, device: torch.device) -> Replicated:
    """The ``train.strategy`` of this run."""
    return Sharded(world, device) if name == "fsdp" else Replicated(world, device)
