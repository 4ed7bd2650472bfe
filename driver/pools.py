"""The teacher and reference actor pools: one spec per role (built from its config section, the
actors' arguments and the cache fingerprint both derive from it), the resources every pool asks
for, and the Ray Data operator that runs a pool."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import ray
import ray.data
from ray.util.annotations import RayDeprecationWarning

from actors.inference import FrozenModel, FrozenModelSpec
from actors.reference import ReferenceLogps
from actors.teacher import TeacherPotentials, TeacherSpec
from driver.inputs import ModelPaths
from tvkd_ray import runtime
from tvkd_ray.config import PoolConfig, TVKDConfig
from tvkd_ray.errors import ResourceError

TOKENIZE_CPUS = 0.5  # tokenising is light; a fractional share keeps it beside the model pools
TOKENIZER_POOL = "tokenizer pool"  # its entry in resource_demand


@dataclass(frozen=True)
class Role:
    """One frozen-model pool of a run: its config section, actor class and spec."""

    name: str
    actor: type[FrozenModel]
    spec: FrozenModelSpec
    pool: PoolConfig


def _model_fields(cfg: TVKDConfig, pool: PoolConfig, model: str) -> dict:
    """A pool's model, numerics and placement; every unset model setting is the student's, so
    by default a pool computes exactly as the student does."""
    trust, student = pool.trust_remote_code, cfg.student
    return {
        "model": model,
        "dtype": pool.dtype or student.dtype,
        "autocast": pool.autocast or student.autocast,
        "attn_implementation": pool.attn_implementation or student.attn_implementation,
        "trust_remote_code": student.trust_remote_code if trust is None else trust,
        "num_gpus": pool.num_gpus_per_actor,
        "num_threads": max(1, int(pool.num_cpus_per_actor)),
        "device_map": pool.device_map or None,
        "offload_folder": pool.offload_folder,
        "idle_priority": True,  # on CPU, the trainers come first
    }


def roles(cfg: TVKDConfig, paths: ModelPaths) -> list[Role]:
    """The pools this run starts, in pipeline order (teacher, then reference)."""
    found = []
    if cfg.uses_teacher:
        loss, teacher = cfg.loss, cfg.teacher
        spec = TeacherSpec(
            **_model_fields(cfg, teacher, paths.teacher),
            potential=cfg.teacher_potential,
            tau=loss.tau,
            q_scale=loss.q_scale,
            normalize=loss.potential_normalize,
            support_top_k=teacher.top_k if loss.sums_top_k else 0,
            ref_model=paths.teacher_ref,
            beta=teacher.beta,
            top_k=teacher.top_k if cfg.uses_top_k else 0,
            rejected_top_k=loss.objective == "release",
        )
        found.append(Role("teacher", TeacherPotentials, spec, teacher))
    if cfg.uses_reference:
        spec = FrozenModelSpec(**_model_fields(cfg, cfg.reference, paths.reference))
        found.append(Role("reference", ReferenceLogps, spec, cfg.reference))
    return found


def worker_resources(cfg: TVKDConfig) -> dict[str, float]:
    """What each Ray Train worker asks for (ScalingConfig.resources_per_worker)."""
    train = cfg.train
    resources = {**train.resources_per_worker, "CPU": train.num_cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return resources


def resource_demand(cfg: TVKDConfig) -> dict[str, dict[str, float]]:
    """The Ray resources (CPU, GPU and custom ones) each pool asks for, by pool name."""
    train = cfg.train
    workers = {k: v * train.num_workers for k, v in worker_resources(cfg).items()}
    demand = {"train workers": workers, TOKENIZER_POOL: {"CPU": TOKENIZE_CPUS}}
    for name, pool in cfg.pools().items():
        per_actor = {**pool.resources, "CPU": pool.num_cpus_per_actor}
        per_actor["GPU"] = pool.num_gpus_per_actor
        demand[f"{name} pool"] = {k: v * pool.num_actors for k, v in per_actor.items()}
    return demand


def check_resources(cfg: TVKDConfig) -> None:
    """Fail in seconds, naming the pool, when the cluster cannot hold every pool at once (a
    request Ray cannot satisfy would otherwise wait forever)."""
    available = ray.cluster_resources()
    demand = resource_demand(cfg)
    custom = sorted({kind for d in demand.values() for kind in d} - {"GPU", "CPU"})
    for kind in ("GPU", "CPU", *custom):
        total = sum(d.get(kind, 0.0) for d in demand.values())
        have = float(available.get(kind, 0.0))
        if total > have + 1e-9:
            unit = f"{kind}s" if kind in ("GPU", "CPU") else f"of resource '{kind}'"
            parts = ", ".join(f"{name} {d[kind]:g}" for name, d in demand.items() if d.get(kind))
            raise ResourceError(
                f"the cluster has {have:g} {unit} but the run needs {total:g} ({parts}); "
                f"lower the per-pool {kind} settings or add nodes that offer it"
            )


def through_pool(ds: ray.data.Dataset, role: Role, board=None, stage: str = "") -> ray.data.Dataset:
    """``ds`` through a fixed-size pool of the role's actors with the pool's resources, each
    block counted as ``stage`` on the progress ``board``; dead actors are restarted
    (``<section>.max_restarts``) and their batches retried."""
    pool = role.pool
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts; only the catch-all one it marks
        # as deprecated (removed in 2.64: ray is pinned below it) takes them.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
        return ds.map_batches(
            role.actor,
            fn_constructor_kwargs={"spec": role.spec, "board": board, "stage": stage},
            batch_size=pool.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.num_actors),
            num_cpus=pool.num_cpus_per_actor,
            num_gpus=pool.num_gpus_per_actor,
            resources=pool.resources or None,
            runtime_env={"env_vars": runtime.ACTOR_ALLOCATOR_ENV},  # merged into the job's env_vars
            max_restarts=pool.max_restarts,
            max_task_retries=-1,
            udf_modifying_row_count=False,
        )
