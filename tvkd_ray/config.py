"""Typed, documented configuration (SPEC §5).

One dataclass per concern, a ``help`` string per field, validation in ``__post_init__`` (per
section) and in :meth:`TVKDConfig.validate` (across sections). YAML files and dotted CLI flags
(``--loss.alpha 0.5``) map onto the same tree; unknown keys, wrong types and incompatible
combinations raise :class:`~tvkd_ray.errors.ConfigError` with one line naming them.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from tvkd_ray.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLED_DATA = REPO_ROOT / "examples" / "data" / "bundled"
DEVICE = re.compile(r"cuda(:\d+)?|cpu|disk")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation, shown by ``--help`` and in docs/CONFIG.md."""
    if isinstance(default, (list, dict)):
        # A fresh copy per instance: configs never share a mutable default.
        return field(
            default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kwargs
        )
    return field(default=default, metadata={"help": help}, **kwargs)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_resources(key: str, resources: dict[str, float], own_keys: dict[str, str]) -> None:
    """Ray resources by name, non-negative; those with a key of their own (``own_keys``: CPU,
    GPU) must be set there."""
    for name, amount in resources.items():
        _require(bool(name.strip()), key, "resource names must not be empty")
        _require(amount >= 0, f"{key}.{name}", f"must be >= 0, got {amount:g}")
        if name in own_keys:
            raise ConfigError(f"{key}.{name}: set it with {own_keys[name]} instead")


@dataclass
class RunConfig:
    """What this run is and where its outputs go."""

    name: str = _field(
        "tvkd-default",
        "Run name. Outputs go to <output_dir>/<name>; rerunning with the same name and output_dir "
        "resumes from the last checkpoint and continues the same MLflow run; once the run has "
        "finished, rerunning it only reports its outputs (see overwrite).",
    )
    output_dir: str = _field(
        "~/tvkd-ray-outputs",
        "Root for run outputs, checkpoints and the default MLflow store. Resolved to an absolute "
        "path at start-up (a Ray job's working directory is a temporary copy).",
    )
    overwrite: bool = _field(
        False,
        "Start <output_dir>/<name> afresh: delete its checkpoints, model and MLflow run link "
        "first (the MLflow run itself stays in the store). Without it, a finished run is not "
        "trained again.",
    )
    seed: int = _field(0, "Seed for model initialisation, data order and dropout.")
    stage: Literal["tvkd", "dpo", "sft"] = _field(
        "tvkd",
        "tvkd: DPO plus the teacher's shaping reward; dpo: plain DPO (alpha = 0, no teacher "
        "actors); sft: behaviour cloning on chosen responses (no reference, no teacher).",
    )

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "run.name", "must not be empty")
        _require("/" not in self.name, "run.name", f"must not contain '/': {self.name!r}")


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the student: only the adapters train, the base weights stay frozen,
    so the reference (the student's initial weights) is exactly the base with adapters off."""

    r: int = _field(16, "Rank of each adapter.")
    alpha: float = _field(32.0, "Scale numerator: an adapter's update is scaled by alpha / r.")
    dropout: float = _field(0.05, "Dropout on the adapters' input while training.")
    target_modules: list[str] = _field(
        ["all-linear"],
        "Names (or name suffixes) of the linear layers to adapt; [all-linear] adapts every "
        "linear layer but the LM head (PEFT's all-linear).",
    )

    def __post_init__(self) -> None:
        _require(self.r >= 1, "student.lora.r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, "student.lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "student.lora.dropout", "must be in [0, 1)")
        _require(bool(self.target_modules), "student.lora.target_modules", "must not be empty")


@dataclass
class StudentConfig:
    """The model being trained."""

    model: str = _field(
        "smollm2-135m-instruct",
        "Base model: a preset name (smollm2-135m-instruct, tiny-teacher, tiny-student), a local "
        "directory, or a hub id when online. The student is built from it (see num_layers, init).",
    )
    tokenizer: str | None = _field(
        None,
        "Tokenizer; null means the student model's own. A teacher with another tokenizer has its "
        "potentials mapped to the student's tokens by character offsets (docs/ARCHITECTURE.md).",
    )
    num_layers: int | None = _field(
        6,
        "Keep only the first num_layers decoder layers of student.model (null keeps all); the "
        "default builds a 6-layer student from the SmolLM2-135M-Instruct teacher.",
    )
    init: Literal["pretrained", "from_config"] = _field(
        "pretrained",
        "pretrained: copy the base model's weights (its first num_layers layers); from_config: "
        "random initialisation from the base model's config with run.seed.",
    )
    dtype: Literal["float32", "bfloat16"] = _field(
        "float32",
        "Dtype of the weights the trainers hold and update (float32: master weights of mixed "
        "precision). The reference holds the same unless reference.dtype says otherwise.",
    )
    autocast: Literal["auto", "bfloat16", "none"] = _field(
        "auto",
        "Dtype the forward passes compute in (torch.autocast); auto: bfloat16 on GPU, none on "
        "CPU. With the reference's dtype and autocast left null the reference scores exactly "
        "as the student computes, so log pi_theta - log pi_ref is 0 at step 0.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _field(
        "sdpa", "Attention kernel of the student (and of the pools unless they set their own)."
    )
    trust_remote_code: bool = _field(
        False,
        "Allow the student's model repository to run its own code (off by default for safety); "
        "the teacher and reference follow it unless they set their own.",
    )
    lora: LoraConfig | None = _field(
        None,
        "Train LoRA adapters instead of every weight, e.g. {r: 16, alpha: 32}; null trains the "
        "full model. The run saves the adapters (<model_dir>/adapter) and the merged model.",
    )

    def __post_init__(self) -> None:
        _require(
            self.num_layers is None or self.num_layers >= 1,
            "student.num_layers",
            f"must be >= 1, got {self.num_layers}",
        )


CACHE_HELP = (
    "auto: stream to the trainers in the first epoch and write what passes to Parquet under "
    "<run.output_dir>/score-cache, keyed by a fingerprint of the data, tokenizer, models and "
    "settings; later epochs and reruns that match read it; none: score every epoch, streaming; "
    "memory: score once before training and keep the results in the object store; a directory "
    "path: score once before training into Parquet there (same fingerprint), reused when it "
    "matches."
)


@dataclass
class PoolConfig:
    """Knobs every frozen-model actor pool has (the teacher's and the reference's); unset model
    settings are as the student's."""

    SECTION: ClassVar[str] = "pool"

    model: str | None = _field(None, "Model (preset, local directory or hub id).")
    dtype: Literal["auto", "float32", "bfloat16"] | None = _field(
        None, "Weights dtype (auto: float32 on CPU, bfloat16 on GPU); null: as student.dtype."
    )
    autocast: Literal["auto", "bfloat16", "float16", "none"] | None = _field(
        None, "Dtype the forward computes in (as student.autocast); null: as the student."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = _field(
        None, "Attention kernel; null: as student.attn_implementation."
    )
    trust_remote_code: bool | None = _field(
        None, "Allow the model repository to run its own code; null: as the student."
    )
    num_actors: int = _field(1, "Actors in the pool.")
    num_cpus_per_actor: float = _field(1.0, "CPUs reserved by each actor.")
    num_gpus_per_actor: float = _field(
        0.0, "GPUs reserved by each actor; above 1 the model is spread over them (device_map)."
    )
    device_map: dict[str, str] = _field(
        {},
        "Where each module of the model lives, as accelerate's device_map (e.g. {model.layers: "
        "cuda, lm_head: cpu}; devices cuda, cuda:N, cpu, disk); empty: the actor's device, or "
        "auto over its GPUs when num_gpus_per_actor > 1. Potentials do not depend on it.",
    )
    offload_folder: str | None = _field(
        None, "Folder for the weights that device_map puts on disk (needed by disk entries)."
    )
    batch_size: int = _field(
        8, "Pairs per forward pass; the largest of the running pools' is the streamed block."
    )
    max_restarts: int = _field(3, "Times a dead actor of this pool is restarted.")
    resources: dict[str, float] = _field(
        {},
        "Custom Ray resources each actor asks for beside its CPUs/GPUs (e.g. {scorer: 1}): the "
        "pool runs only on nodes started with them (ray start --resources).",
    )
    cache: str = _field("auto", CACHE_HELP)

    def __post_init__(self) -> None:
        section = self.SECTION
        actors, cpus, gpus = self.num_actors, self.num_cpus_per_actor, self.num_gpus_per_actor
        _require(actors >= 1, f"{section}.num_actors", f"must be >= 1, got {actors}")
        _require(cpus > 0, f"{section}.num_cpus_per_actor", f"must be > 0, got {cpus}")
        _require(gpus >= 0, f"{section}.num_gpus_per_actor", f"must be >= 0, got {gpus}")
        _require(self.batch_size >= 1, f"{section}.batch_size", "must be >= 1")
        _require(self.max_restarts >= 0, f"{section}.max_restarts", "must be >= 0")
        _require(
            bool(self.cache.strip()), f"{section}.cache", "must be auto, none, memory or a path"
        )
        own = {"CPU": f"{section}.num_cpus_per_actor", "GPU": f"{section}.num_gpus_per_actor"}
        self.resources = dict(self.resources)  # never the caller's dict
        _check_resources(f"{section}.resources", self.resources, own)
        self.device_map = dict(self.device_map)
        for module, device in self.device_map.items():
            _require(
                DEVICE.fullmatch(device) is not None,
                f"{section}.device_map.{module}",
                f"must be cuda, cuda:N, cpu or disk, got {device!r}",
            )
        _require(
            "disk" not in self.device_map.values() or bool(self.offload_folder),
            f"{section}.offload_folder",
            f"is needed by the disk entries of {section}.device_map",
        )


@dataclass
class ReferenceConfig(PoolConfig):
    """The frozen reference model pi_ref, served by its own actor pool."""

    SECTION: ClassVar[str] = "reference"

    model: str | None = _field(
        None, "Reference model; null means the student's initial weights (the usual DPO setup)."
    )
    cache: str = _field("auto", f"Reference log-probs: {CACHE_HELP}")


@dataclass
class TeacherConfig(PoolConfig):
    """The large teacher whose value function gives the potentials, served by its own actors."""

    SECTION: ClassVar[str] = "teacher"

    model: str | None = _field(
        "smollm2-135m-instruct", "Teacher model (preset, local directory or hub id)."
    )
    dtype: Literal["auto", "float32", "bfloat16"] | None = _field(
        "auto",
        "Weights dtype (auto: float32 on CPU, bfloat16 on GPU, half the memory of the "
        "student's float32 master weights); null: as student.dtype.",
    )
    cache: str = _field("auto", f"Teacher potentials (and top-k): {CACHE_HELP}")
    ref_model: str | None = _field(
        None,
        "The teacher's pre-DPO checkpoint; required by loss.potential = implicit_reward.",
    )
    top_k: int = _field(
        50,
        "k of the teacher's top-k tokens: the support of the bounded soft value "
        "(loss.potential_support), and streamed for loss.kd_weight > 0 and "
        "loss.objective=release; 50 as in the TVKD authors' code.",
    )
    beta: float = _field(0.1, "beta_T of the implicit_reward potential.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.top_k >= 1, "teacher.top_k", "must be >= 1")
        _require(self.beta > 0, "teacher.beta", f"must be > 0, got {self.beta}")


@dataclass
class DataConfig:
    """Preference data (SPEC §4)."""

    train_path: str | None = _field(
        str(BUNDLED_DATA / "train.jsonl"),
        "Training pairs: JSONL (.gz), Parquet or a saved Hugging Face dataset directory. "
        "Defaults to the bundled dataset. Ignored when fit() is given a Ray Dataset.",
    )
    eval_path: str | None = _field(
        str(BUNDLED_DATA / "eval.jsonl"), "Evaluation pairs (same formats); null for none."
    )
    format: Literal["auto", "standard", "conversational", "implicit_prompt"] = _field(
        "auto", "Row format; auto detects it from the first row."
    )
    max_length: int = _field(
        256, "Maximum prompt + response tokens; responses are cut on the right."
    )
    max_prompt_length: int = _field(128, "Maximum prompt tokens; prompts are cut on the left.")
    on_invalid: Literal["error", "skip"] = _field(
        "error", "error: stop on the first invalid row; skip: drop invalid rows and count them."
    )
    eval_fraction: float = _field(
        0.0, "Share of the training pairs held out for evaluation when eval_path is null."
    )

    def __post_init__(self) -> None:
        _require(self.max_length >= 2, "data.max_length", "must be >= 2")
        _require(
            0 < self.max_prompt_length < self.max_length,
            "data.max_prompt_length",
            f"must be in (0, data.max_length={self.max_length}), got {self.max_prompt_length}",
        )
        _require(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")


@dataclass
class LossConfig:
    """The TVKD objective (SPEC §2).

    How the defaults were chosen (docs/RESULTS.md, round 2): the default potential and alpha must
    not lose to DPO by more than the seed spread on either dataset, i.e. the mean per-seed paired
    difference against DPO must be at least minus the standard deviation of DPO's accuracy over
    seeds, on HH-RLHF (5 seeds) and on the bundled pairs (3 seeds); the default potential must need
    only the teacher (implicit_reward also needs its pre-DPO checkpoint). No variant beat DPO on
    both, so the default is the one that lost least on its worse dataset: the TVKD authors' bounded
    soft value (potential_normalize, q_scale 0.7, the teacher's top-50 plus a rest bucket) at
    alpha * (1 - gamma) = 0.05: -0.004 on HH-RLHF (DPO spread 0.023) and -0.000 on the bundled
    pairs (spread 0.024). At 0.1 it lost 0.018 on HH-RLHF, at 0.5 0.048; the raw-logit soft
    value (round 1's default) lost 5.0 accuracy points at 0.01 and 8.7 at 0.05, `release` 17.
    implicit_reward at 0.1 matched DPO on HH-RLHF (+0.014, within the seed spread): use it
    (alpha 1) when the teacher's pre-DPO checkpoint exists.
    """

    objective: Literal["tvkd", "release"] = _field(
        "tvkd",
        "tvkd: DPO plus the teacher's potential-based shaping (SPEC §2.3, the paper's objective); "
        "release: the TVKD authors' released recipe, reference-free and without beta: per token "
        "log q(y_t) - gamma * H(q(.|s_t+1)), q the student's distribution collapsed onto the "
        "teacher's top-k ids plus a rest bucket, loss -log sigmoid(R+ - R-) (their recipe uses "
        "gamma 1; alpha and the potential are not used, the reference only reports rewards/*).",
    )
    beta: float = _field(0.1, "DPO temperature beta on the policy/reference log-ratio.")
    alpha: float = _field(
        0.5,
        "Teacher-signal strength alpha on the shaping return; 0 is plain DPO. Default 0.5 (with "
        "gamma 0.9, alpha * (1 - gamma) = 0.05) by the rule above; the bounded soft value lost "
        "0.018 to DPO at alpha 1 and 0.048 at alpha 5. With implicit_reward alpha 1 matched DPO "
        "(+0.014, within the seed spread).",
    )
    gamma: float = _field(
        0.9,
        "Discount gamma in [0, 1] of the shaping; with 1 the shaping cancels between pairs. With "
        "center_potentials (the default) alpha and gamma act only through alpha * (1 - gamma).",
    )
    tau: float = _field(1.0, "Temperature tau of the soft_value potential.")
    q_scale: float = _field(
        0.7, "Scale q of the teacher logits read as Q-values (0.7 as in the TVKD authors' code)."
    )
    potential: Literal["soft_value", "implicit_reward"] = _field(
        "soft_value",
        "soft_value: tau * log sum exp(q * z / tau) of the teacher's logits z, or of its "
        "log-probabilities with potential_normalize (needs no teacher reference, hence the "
        "default); implicit_reward: the DPO teacher's implicit reward of the prefix (needs "
        "teacher.ref_model). In docs/RESULTS.md implicit_reward carried the DPO teacher's "
        "preference signal best; prefer it whenever the teacher's pre-DPO checkpoint exists.",
    )
    potential_normalize: bool = _field(
        True,
        "soft_value of the teacher's log-probabilities (log_softmax) instead of its raw logits: "
        "a bounded potential, tau * log sum pi^(q/tau); raw logits lost 5.0 accuracy points to "
        "DPO at alpha * (1 - gamma) = 0.01 and 8.7 at 0.05 (round 1).",
    )
    potential_support: Literal["auto", "vocab", "top_k"] = _field(
        "auto",
        "What soft_value sums over: the whole vocabulary, or the teacher's teacher.top_k most "
        "likely tokens plus one rest bucket (the TVKD authors' code; needs potential_normalize). "
        "auto: top_k for the normalised soft value of objective tvkd, else vocab.",
    )
    center_potentials: bool = _field(
        True, "Subtract each sequence's prompt-state potential Phi(s_1) from its potentials."
    )
    label_smoothing: float = _field(0.0, "Label smoothing epsilon of the preference loss.")
    bc_weight: float = _field(0.0, "Weight of behaviour cloning (NLL of chosen responses).")
    kd_weight: float = _field(
        0.0,
        "Weight of token-level KL(teacher || student) over the teacher's top-k on chosen; needs "
        "the teacher and the student to share one tokenizer.",
    )

    def __post_init__(self) -> None:
        _require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        _require(self.alpha >= 0, "loss.alpha", f"must be >= 0, got {self.alpha}")
        _require(0.0 <= self.gamma <= 1.0, "loss.gamma", f"must be in [0, 1], got {self.gamma}")
        _require(self.tau > 0, "loss.tau", f"must be > 0, got {self.tau}")
        _require(
            0.0 <= self.label_smoothing < 0.5,
            "loss.label_smoothing",
            f"must be in [0, 0.5), got {self.label_smoothing}",
        )
        _require(
            not (self.normalised_soft_value and self.q_scale == self.tau),
            "loss.q_scale",
            "equal to loss.tau with loss.potential_normalize makes every soft_value potential 0 "
            "(TVKD would be plain DPO); change one of them, or set loss.potential_normalize=false "
            "for the raw-logit soft value",
        )
        if self.potential_support == "top_k":
            _require(
                self.potential_normalize,
                "loss.potential_support",
                "top_k sums probabilities into a rest bucket, so it needs "
                "loss.potential_normalize=true",
            )
            _require(
                self.potential == "soft_value" and self.objective == "tvkd",
                "loss.potential_support",
                "top_k is the support of the soft_value potential of objective tvkd "
                f"(got potential {self.potential}, objective {self.objective})",
            )
        _require(self.bc_weight >= 0, "loss.bc_weight", "must be >= 0")
        _require(self.kd_weight >= 0, "loss.kd_weight", "must be >= 0")

    @property
    def normalised_soft_value(self) -> bool:
        """Whether the shaping uses the bounded soft value, of the teacher's log-probabilities."""
        return (
            self.potential_normalize and self.potential == "soft_value" and self.objective == "tvkd"
        )

    @property
    def sums_top_k(self) -> bool:
        """Whether the soft_value potential sums over the teacher's top-k plus a rest bucket."""
        if self.potential_support == "auto":
            return self.normalised_soft_value
        return self.potential_support == "top_k"


@dataclass
class TrainConfig:
    """Ray Train student workers and the optimiser."""

    num_workers: int = _field(1, "Data-parallel student workers (Ray Train).")
    strategy: Literal["ddp", "fsdp"] = _field(
        "ddp",
        "ddp: every worker holds the whole student (DistributedDataParallel); fsdp: weights, "
        "gradients and optimiser state are sharded over the workers (torch FSDP2, one unit per "
        "decoder layer), for students that do not fit one device.",
    )
    gradient_checkpointing: bool = _field(
        False,
        "Recompute each decoder layer's activations in the backward pass instead of keeping "
        "them: far less activation memory for about one more forward of compute.",
    )
    use_gpu: bool = _field(
        False, "Give each worker a GPU (one, or resources_per_worker.GPU of one)."
    )
    num_cpus_per_worker: float = _field(1.0, "CPUs reserved by each training worker.")
    batch_size: int = _field(8, "Pairs per worker per step (each forward holds 2x rows).")
    grad_accum: int = _field(1, "Micro-batches accumulated per optimiser step.")
    lr: float = _field(2e-5, "AdamW peak learning rate.")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    warmup_ratio: float = _field(
        0.1,
        "Share of the run (of its pairs, or of max_steps when that ends it) with linear warm-up "
        "before the cosine decay, which ends at the run's last step.",
    )
    epochs: int = _field(1, "Passes over the training pairs.")
    max_steps: int | None = _field(None, "Stop after this many optimiser steps (null: epochs).")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    log_every: int = _field(1, "Report metrics every this many steps.")
    save_every: int = _field(0, "Checkpoint every this many steps (0: only at the end).")
    eval_every: int = _field(0, "Evaluate every this many steps (0: only at the end).")
    eval_on_start: bool = _field(
        True, "Evaluate before the first step too, so every eval curve starts at the baseline."
    )
    max_failures: int = _field(0, "Worker failures Ray Train recovers from the last checkpoint.")
    resources_per_worker: dict[str, float] = _field(
        {},
        "Ray resources of each worker, as in Ray Train's ScalingConfig (e.g. {trainer: 1}): "
        "custom resources pin the workers to nodes that offer them; CPU here is "
        "num_cpus_per_worker, GPU the share of a GPU per worker (needs use_gpu).",
    )

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "train.num_workers", "must be >= 1")
        self._merge_cpu_gpu()
        _require(self.num_cpus_per_worker > 0, "train.num_cpus_per_worker", "must be > 0")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        _require(self.log_every >= 1, "train.log_every", "must be >= 1")
        _require(self.save_every >= 0, "train.save_every", "must be >= 0")
        _require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _require(self.max_failures >= 0, "train.max_failures", "must be >= 0")

    def _merge_cpu_gpu(self) -> None:
        """CPU in resources_per_worker is num_cpus_per_worker (one value, one place after
        validation); GPU stays there as the per-worker share and needs use_gpu."""
        key = "train.resources_per_worker"
        self.resources_per_worker = dict(self.resources_per_worker)  # never the caller's dict
        _check_resources(key, self.resources_per_worker, own_keys={})
        if "CPU" in self.resources_per_worker:
            cpus = float(self.resources_per_worker.pop("CPU"))
            default = TrainConfig.num_cpus_per_worker
            _require(
                self.num_cpus_per_worker in (default, cpus),
                f"{key}.CPU",
                f"{cpus:g} disagrees with train.num_cpus_per_worker={self.num_cpus_per_worker:g}",
            )
            self.num_cpus_per_worker = cpus
        if "GPU" in self.resources_per_worker:
            gpus = self.resources_per_worker["GPU"]
            _require(self.use_gpu, f"{key}.GPU", "needs train.use_gpu=true")
            _require(gpus > 0, f"{key}.GPU", f"must be > 0 with train.use_gpu, got {gpus:g}")

    @property
    def gpus_per_worker(self) -> float:
        return self.resources_per_worker.get("GPU", 1.0) if self.use_gpu else 0.0


@dataclass
class TrackingConfig:
    """MLflow tracking (rank 0 only)."""

    enabled: bool = _field(True, "Log params, metrics and artifacts to MLflow.")
    uri: str | None = _field(
        None,
        "Tracking URI; null means $MLFLOW_TRACKING_URI or sqlite:///<output_dir>/mlflow.db.",
    )
    experiment: str = _field("tvkd-ray", "MLflow experiment name.")


@dataclass
class TVKDConfig:
    """The whole run configuration: one section per concern."""

    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cross-section checks; each names the incompatible keys."""
        stage = self.run.stage
        if stage == "tvkd":
            _require(
                bool(self.teacher.model),
                "teacher.model",
                "run.stage=tvkd needs a teacher model (or use run.stage=dpo)",
            )
        _require(
            not (self.loss.objective == "release" and stage != "tvkd"),
            "loss.objective",
            f"release scores the student on the teacher's top-k, so run.stage must be tvkd "
            f"(got {stage})",
        )
        if self.uses_teacher and self.teacher_potential == "implicit_reward":
            _require(
                bool(self.teacher.ref_model),
                "teacher.ref_model",
                "loss.potential=implicit_reward needs the teacher's pre-DPO checkpoint",
            )
        _require(
            not (self.loss.kd_weight > 0 and stage != "tvkd"),
            "loss.kd_weight",
            f"needs teacher outputs, so run.stage must be tvkd (got {stage})",
        )
        _require(
            not (self.data.eval_path and self.data.eval_fraction > 0),
            "data.eval_fraction",
            "set either data.eval_path or data.eval_fraction, not both",
        )
        _require(
            not (self.student.lora and self.train.strategy == "fsdp"),
            "student.lora",
            "LoRA trains with train.strategy=ddp (the frozen base is replicated, the adapters "
            "are small); fsdp shards full fine-tuning",
        )
        self._check_flash_attention()

    def _check_flash_attention(self) -> None:
        """flash_attention_2 runs on CUDA only: each role asking for it must have a GPU."""
        student = self.student.attn_implementation
        _require(
            student != "flash_attention_2" or self.train.use_gpu,
            "student.attn_implementation",
            "flash_attention_2 runs on CUDA only and needs train.use_gpu=true (or use sdpa)",
        )
        for section, pool in self.pools().items():
            attn = pool.attn_implementation or student
            _require(
                attn != "flash_attention_2" or pool.num_gpus_per_actor > 0,
                f"{section}.attn_implementation",
                f"flash_attention_2 runs on CUDA only and needs {section}.num_gpus_per_actor > 0 "
                f"(set {section}.attn_implementation: sdpa)",
            )

    @property
    def uses_teacher(self) -> bool:
        """Whether teacher actors run: TVKD with a shaping or KD term, or the release objective."""
        loss = self.loss
        return self.run.stage == "tvkd" and (
            loss.alpha > 0 or loss.kd_weight > 0 or loss.objective == "release"
        )

    @property
    def teacher_potential(self) -> str:
        """The potential the teacher actors compute: ``loss.potential``, or under the release
        objective (which uses none) the cheapest, soft_value, which needs no teacher.ref_model."""
        return "soft_value" if self.loss.objective == "release" else self.loss.potential

    @property
    def uses_top_k(self) -> bool:
        """Whether the student is scored on the teacher's top-k ids (KD or release): teacher and
        student must then share one vocabulary, and k must be smaller than it."""
        return self.uses_teacher and (self.loss.kd_weight > 0 or self.loss.objective == "release")

    @property
    def uses_reference(self) -> bool:
        """Whether reference actors run: every stage but sft."""
        return self.run.stage != "sft"

    def pools(self) -> dict[str, PoolConfig]:
        """The frozen-model pools this run starts, by section name, in pipeline order."""
        pools: dict[str, PoolConfig] = {}
        if self.uses_teacher:
            pools["teacher"] = self.teacher
        if self.uses_reference:
            pools["reference"] = self.reference
        return pools

    @property
    def run_dir(self) -> Path:
        """Absolute directory of this run's outputs."""
        return resolve_path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(TVKDConfig)}
# `from __future__ import annotations` turns field types into strings; resolve them once.
SECTIONS = {name: globals()[typ] if isinstance(typ, str) else typ for name, typ in SECTIONS.items()}


def resolve_path(path: str) -> Path:
    """Absolute path with ``~`` expanded (relative paths resolve against the current directory)."""
    return Path(os.path.expanduser(path)).resolve()


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation, converting only lossless cases (int -> float)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())  # our own annotations, resolved once per call
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if dataclasses.is_dataclass(annotation):
        return _section_from_dict(key, value, annotation)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args
        return {
            _coerce(key, k, key_type): _coerce(f"{key}.{k}", v, value_type)
            for k, v in value.items()
        }
    if origin is Literal:
        if value not in args:
            choices = " | ".join(str(a) for a in args)
            raise ConfigError(f"{key}: must be one of {choices}, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def _unknown(key: str, candidates: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(key.rsplit(".", 1)[-1], candidates, n=1)
    if not hint:
        hint = difflib.get_close_matches(key, candidates, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
    return ConfigError(f"unknown config key '{key}'{suggestion}")


def config_from_dict(tree: dict[str, Any] | None) -> TVKDConfig:
    """Build and validate a config from a nested dict (as loaded from YAML)."""
    tree = tree or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(tree).__name__}")
    sections = {}
    for name, section_value in tree.items():
        if name not in SECTIONS:
            raise _unknown(name, list(SECTIONS))
        if section_value is None:
            section_value = {}
        sections[name] = _section_from_dict(name, section_value, SECTIONS[name])
    return TVKDConfig(**sections)


def _section_from_dict(name: str, tree: Any, cls: type) -> Any:
    """A section (or a sub-section such as student.lora) from its mapping, fields checked."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(tree).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in tree.items():
        if key not in fields:
            raise _unknown(f"{name}.{key}", list(fields))
        values[key] = _coerce(f"{name}.{key}", value, fields[key].type)
    return cls(**values)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None):
    """Load a YAML file (or the defaults) and apply ``section.key=value`` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})"
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, _, name = key.partition(".")
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS))
        parent = tree
        # student.lora.r=8 sets r inside the student.lora mapping.
        *path, leaf = [section, *name.split(".")]
        for part in path:
            child = parent.get(part)
            parent[part] = child = child if isinstance(child, dict) else {}
            parent = child
        parent[leaf] = yaml.safe_load(raw) if raw != "" else ""
    return config_from_dict(tree)


def field_docs() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, help) of every field, in declaration order."""
    rows = []
    for section, cls in SECTIONS.items():
        rows += _field_rows(section, cls)
    return rows


def _field_rows(prefix: str, cls: type) -> list[tuple[str, str, Any, str]]:
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f"{prefix}.{f.name}", str(f.type), default, f.metadata["help"]))
        inner = _sub_section(f.type)
        if inner is not None:  # e.g. student.lora: its keys follow it
            rows += _field_rows(f"{prefix}.{f.name}", inner)
    return rows


def _sub_section(annotation: Any) -> type | None:
    """The dataclass a field holds (``LoraConfig | None`` -> LoraConfig), if any."""
    if isinstance(annotation, str):
        annotation = eval(annotation, globals())
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def config_reference_markdown() -> str:
    """The configuration reference in Markdown (docs/CONFIG.md is generated from it)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `tvkd_ray/config.py` by `make docs`; do not edit by hand.",
        "Set a key in the YAML file under its section or on the command line as "
        "`--section.key value`.",
    ]
    current = None
    for key, typ, default, help_text in field_docs():
        section = key.split(".")[0]
        if section != current:
            current = section
            doc = inspect.cleandoc(SECTIONS[section].__doc__ or "")
            lines += [
                "",
                f"## `{section}`",
                "",
                doc,
                "",
                "| key | type | default | meaning |",
                "| --- | --- | --- | --- |",
            ]
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        if section == "data" and isinstance(default, str) and str(REPO_ROOT) in default:
            shown = default.replace(str(REPO_ROOT) + "/", "<repo>/")
        typ = typ.replace("|", "\\|")
        lines.append(f"| `{key}` | `{typ}` | `{shown}` | {help_text} |")
    return "\n".join(lines) + "\n"
