"""Students bigger than one device, end to end on real Ray Train runs: a LoRA student with
gradient checkpointing (adapters saved, the merged model loadable as any other), and a student
sharded by FSDP over two gloo workers, with an eval set smaller than the workers."""

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_on_cpu import TINY, _write_pairs
from transformers import AutoModelForCausalLM

from tvkd_ray.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # whole fits: make test-e2e


def _fit(tmp_path: Path, name: str, overrides: list[str]):
    import tvkd_ray

    train = _write_pairs(tmp_path / "train.jsonl", 16)
    evalp = _write_pairs(tmp_path / "eval.jsonl", 3, offset=100)
    common = [
        f"run.output_dir={tmp_path / 'out'}",
        f"run.name={name}",
        f"data.train_path={train}",
        f"data.eval_path={evalp}",
        "train.batch_size=4",
        "train.max_steps=4",
        "train.save_every=2",
        "train.gradient_checkpointing=true",
    ]
    return tvkd_ray.fit(load_config(TINY, [*common, *overrides]))


def _history(result, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(result.tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(result.mlflow_run_id, key)}


def _assert_starts_at_the_reference(result) -> None:
    """Step 0: the student computes exactly as the reference, so every margin is 0, no win."""
    assert _history(result, "eval/rewards/margins")[0] == 0.0
    assert _history(result, "eval/rewards/accuracies")[0] == 0.0
    assert set(_history(result, "eval/num_pairs").values()) == {3.0}


def _last_checkpoint(result) -> Path:
    return Path(result.checkpoint_dir)


def test_lora_student_saves_its_adapters_and_a_loadable_merged_model(ray_cluster, tmp_path):
    from peft import PeftModel

    result = _fit(
        tmp_path,
        "lora",
        ["student.lora.r=4", "student.lora.dropout=0.0", "train.lr=1e-2"],
    )
    _assert_starts_at_the_reference(result)
    model_dir = Path(result.model_dir)
    adapter_dir = model_dir / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    # Checkpoints hold the adapters only, not the frozen base.
    checkpointed = load_file(_last_checkpoint(result) / "model.safetensors")
    assert checkpointed and all("lora_" in key for key in checkpointed)

    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_dir = Path(result.run_dir) / "student_init"
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    # The base stayed frozen (embeddings), the adapted projections moved.
    assert torch.equal(merged.model.embed_tokens.weight, base.model.embed_tokens.weight)
    q_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_merged, base.model.layers[0].self_attn.q_proj.weight)
    # The merged model computes as the base with the saved adapters on.
    with_adapters = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(ids).logits, with_adapters(ids).logits, rtol=1e-4, atol=1e-4
        )


def test_fsdp_student_trains_sharded_over_two_workers(ray_cluster, tmp_path):
    result = _fit(
        tmp_path,
        "fsdp",
        [
            "run.stage=dpo",
            "train.strategy=fsdp",
            "train.num_workers=2",
            "train.num_cpus_per_worker=0.5",
        ],
    )
    # Two workers, three eval pairs in one block: one worker scores placeholders only, and
    # still joins every FSDP all-gather.
    _assert_starts_at_the_reference(result)
    seen = np.load(Path(result.run_dir) / "pairs_seen" / "epoch0.npy")
    assert sorted(seen.tolist()) == list(range(16))  # every pair once, over both shards
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    checkpointed = load_file(_last_checkpoint(result) / "model.safetensors")
    state = model.state_dict()
    # The final checkpoint and the saved model hold the same, whole (gathered) weights.
    assert checkpointed.keys() <= state.keys()
    for key, value in checkpointed.items():
        assert value.shape == state[key].shape, key
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
