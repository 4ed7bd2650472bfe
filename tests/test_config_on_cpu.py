"""Config: YAML + dotted overrides, documented fields, one-line errors for bad input."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from actors.inference import FrozenModelSpec
from driver import pools
from driver.inputs import ModelPaths
from driver.streams import rows_per_block
from tvkd_ray.config import (
    TeacherConfig,
    TVKDConfig,
    config_from_dict,
    config_reference_markdown,
    field_docs,
    load_config,
)
from tvkd_ray.errors import ConfigError
from tvkd_ray.step import Objective

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate_and_resolve_absolute_run_dir():
    cfg = load_config()
    assert isinstance(cfg, TVKDConfig)
    assert cfg.run_dir.is_absolute()
    assert cfg.run_dir.name == cfg.run.name


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  alpha: 0.25\ntrain:\n  lr: 1e-5\n  max_steps: 3\n")
    cfg = load_config(path, ["loss.gamma=0.5", "train.max_steps=7", "teacher.ref_model=null"])
    assert cfg.loss.alpha == 0.25
    assert cfg.train.lr == pytest.approx(1e-5)  # YAML 1.1 reads 1e-5 as a string
    assert isinstance(cfg.loss.gamma, float) and cfg.loss.gamma == 0.5
    assert cfg.train.max_steps == 7
    assert cfg.teacher.ref_model is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["loss.alpah=0.1"], "unknown config key 'loss.alpah' (did you mean 'loss.alpha'?)"),
        (["los.alpha=0.1"], "unknown config key 'los' (did you mean 'loss'?)"),
        (["train.batch_size=four"], "train.batch_size: expected int, got str 'four'"),
        (["train.use_gpu=3"], "train.use_gpu: expected bool"),
        (["loss.gamma=1.5"], "loss.gamma: must be in [0, 1], got 1.5"),
        (["loss.alpha=-0.1"], "loss.alpha: must be >= 0, got -0.1"),
        (["loss.q_scale=1.0"], "loss.q_scale: equal to loss.tau with loss.potential_normalize"),
        (["run.stage=ppo"], "run.stage: must be one of tvkd | dpo | sft, got 'ppo'"),
        (["teacher.model=null"], "teacher.model: run.stage=tvkd needs a teacher model"),
        (
            ["loss.potential=implicit_reward"],
            "teacher.ref_model: loss.potential=implicit_reward needs",
        ),
        (["run.stage=dpo", "loss.kd_weight=0.5"], "loss.kd_weight: needs teacher outputs"),
        (["data.max_prompt_length=300"], "data.max_prompt_length: must be in (0, data.max_length"),
        (["loss.alpha"], "must look like section.key=value"),
        (
            ["student.lora.alpah=8"],
            "unknown config key 'student.lora.alpah' (did you mean 'student.lora.alpha'?)",
        ),
        (["student.lora.r=0"], "student.lora.r: must be >= 1, got 0"),
        (["student.lora=8"], "student.lora: expected a mapping, got int"),
        (["student.lora.target_modules=q_proj"], "student.lora.target_modules: expected a list"),
        (["student.lora.target_modules=[]"], "student.lora.target_modules: must not be empty"),
        (
            ["student.lora.r=8", "train.strategy=fsdp"],
            "student.lora: LoRA trains with train.strategy=ddp",
        ),
        (["train.strategy=zero3"], "train.strategy: must be one of ddp | fsdp, got 'zero3'"),
        (
            ["student.attn_implementation=flash_attention_2"],
            "student.attn_implementation: flash_attention_2 runs on CUDA only and needs "
            "train.use_gpu=true",
        ),
        (
            ["teacher.attn_implementation=flash_attention_2"],
            "teacher.attn_implementation: flash_attention_2 runs on CUDA only and needs "
            "teacher.num_gpus_per_actor > 0",
        ),
        (
            ["teacher.device_map={lm_head: gpu0}"],
            "teacher.device_map.lm_head: must be cuda, cuda:N, cpu or disk, got 'gpu0'",
        ),
        (
            ["reference.device_map={model.layers: disk}"],
            "reference.offload_folder: is needed by the disk entries of reference.device_map",
        ),
    ],
)
def test_bad_config_gives_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("overrides", "support_top_k"),
    [
        ([], 50),
        (["teacher.top_k=20"], 20),
        (["loss.potential_support=vocab"], 0),
        (["loss.potential_normalize=false"], 0),
        (["loss.potential=implicit_reward", "teacher.ref_model=r"], 0),
        (["loss.objective=release"], 0),
    ],
)
def test_the_default_potential_sums_over_the_teachers_top_k(overrides, support_top_k):
    """potential_support auto: the bounded soft value's support is teacher.top_k + a rest bucket;
    the raw-logit soft value, implicit_reward and release sum over no top-k."""
    cfg = load_config(None, overrides)
    paths = ModelPaths(tokenizer="s", student_init="s", reference="s", teacher="t")
    (teacher,) = [role for role in pools.roles(cfg, paths) if role.name == "teacher"]
    assert teacher.spec.support_top_k == support_top_k


def test_q_scale_equal_to_tau_is_refused_only_where_the_bounded_soft_value_is_used():
    """q = tau zeroes the normalised soft value; implicit_reward and release do not use it."""
    ir = load_config(
        None, ["loss.potential=implicit_reward", "teacher.ref_model=r", "loss.tau=0.7"]
    )
    release = load_config(None, ["loss.objective=release", "loss.q_scale=1.0"])
    raw = load_config(None, ["loss.potential_normalize=false", "loss.q_scale=1.0"])
    assert not any(c.loss.normalised_soft_value for c in (ir, release, raw))


def test_dpo_stage_needs_no_teacher():
    cfg = load_config(None, ["run.stage=dpo", "teacher.model=null"])
    assert not cfg.uses_teacher and Objective.from_config(cfg).alpha == 0.0
    assert list(cfg.pools()) == ["reference"]
    assert list(load_config(None, ["run.stage=sft"]).pools()) == []


def test_pools_own_their_knobs_and_inherit_the_students_model_settings():
    """The reference computes exactly as the student (dtype, autocast, attention) unless it sets
    its own; the teacher keeps its own dtype (auto: bf16 on GPU) but the student's autocast;
    restarts and resources are each pool's own; the streamed block size never comes from a pool
    that does not run."""
    paths = ModelPaths(student_init="s", reference="r", tokenizer="s", teacher="t")
    overrides = ["student.dtype=bfloat16", "student.autocast=none", "reference.max_restarts=7"]
    cfg = load_config(None, [*overrides, "student.attn_implementation=eager"])
    specs = {role.name: role.spec for role in pools.roles(cfg, paths)}
    reference, teacher = specs["reference"], specs["teacher"]
    assert (reference.dtype, reference.autocast, reference.attn_implementation) == (
        "bfloat16",
        "none",
        "eager",
    )
    assert (teacher.dtype, teacher.autocast, teacher.attn_implementation) == (
        "auto",
        "none",
        "eager",
    )
    roles = {role.name: role for role in pools.roles(cfg, paths)}
    assert roles["reference"].pool.max_restarts == 7 and roles["teacher"].pool.max_restarts == 3
    own = load_config(
        None,
        ["teacher.dtype=float32", "teacher.trust_remote_code=true", "reference.autocast=bfloat16"],
    )
    teacher, reference = pools.roles(own, paths)
    assert (teacher.spec.dtype, teacher.spec.trust_remote_code) == ("float32", True)
    assert (reference.spec.dtype, reference.spec.trust_remote_code) == ("float32", False)
    assert (reference.spec.autocast, teacher.spec.autocast) == ("bfloat16", "auto")
    spread = ["teacher.device_map={lm_head: disk, model: cpu}", "teacher.offload_folder=/x"]
    teacher, reference = pools.roles(load_config(None, spread), paths)
    assert teacher.spec.device_map == {"lm_head": "disk", "model": "cpu"}
    assert teacher.spec.offload_folder == "/x" and reference.spec.device_map is None
    dpo = load_config(None, ["run.stage=dpo", "teacher.batch_size=64", "reference.batch_size=4"])
    assert rows_per_block(dpo) == 4
    assert rows_per_block(load_config(None, ["run.stage=sft", "train.batch_size=5"])) == 5


def test_the_fingerprint_sees_device_and_numerics_not_placement():
    """A GPU and a CPU actor, bf16 and fp32, sdpa and eager compute different values, so their
    cache entries differ; a GPU share or a thread count only places the work."""
    base = FrozenModelSpec(model="m")
    assert base.output_fields()["device"] == "cpu"
    assert base.output_fields()["dtype"] == "float32"  # auto, resolved on CPU
    on_gpu = dataclasses.replace(base, num_gpus=0.5)
    assert on_gpu.output_fields()["device"] == "cuda"
    assert on_gpu.output_fields()["dtype"] == "bfloat16"
    assert on_gpu.output_fields()["autocast"] == "bfloat16"
    assert dataclasses.replace(base, num_gpus=1.0).output_fields() == on_gpu.output_fields()
    assert dataclasses.replace(base, num_threads=7).output_fields() == base.output_fields()
    offloaded = dataclasses.replace(base, device_map={"lm_head": "disk"}, offload_folder="/x")
    assert offloaded.output_fields() == base.output_fields()  # same values (tested in actors)
    eager = dataclasses.replace(base, attn_implementation="eager")
    assert eager.output_fields() != base.output_fields()


def test_custom_resources_place_pools_and_workers():
    """teacher.resources / reference.resources / train.resources_per_worker reach Ray beside
    the CPU/GPU counts; CPU in resources_per_worker is num_cpus_per_worker (Ray's spelling)."""
    cfg = load_config(
        None,
        [
            "teacher.resources={scorer: 1}",
            "reference.resources={scorer: 0.5}",
            "train.resources_per_worker={CPU: 2, trainer: 1}",
            "train.num_workers=3",
        ],
    )
    assert cfg.train.num_cpus_per_worker == 2 and "CPU" not in cfg.train.resources_per_worker
    assert pools.worker_resources(cfg) == {"trainer": 1.0, "CPU": 2.0}
    demand = pools.resource_demand(cfg)
    assert demand["train workers"] == {"trainer": 3.0, "CPU": 6.0}
    assert demand["teacher pool"]["scorer"] == 1.0 and demand["reference pool"]["scorer"] == 0.5
    gpu = load_config(None, ["train.use_gpu=true", "train.resources_per_worker={GPU: 0.5}"])
    assert pools.worker_resources(gpu)["GPU"] == 0.5
    assert pools.worker_resources(load_config(None, ["train.use_gpu=true"]))["GPU"] == 1.0
    bad = {
        "teacher.resources={GPU: 1}": r"^teacher.resources.GPU: set it with teacher.num_gpus",
        "reference.resources={scorer: -1}": r"^reference.resources.scorer: must be >= 0",
        "teacher.resources=3": r"^teacher.resources: expected a mapping, got int 3$",
        "train.resources_per_worker={GPU: 1}": r"^train.resources_per_worker.GPU: needs train.use",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"GPU: must be > 0 with train.use_gpu, got 0$"):
        load_config(None, ["train.use_gpu=true", "train.resources_per_worker={GPU: 0}"])
    # Every config has dicts of its own: changing one never changes another.
    mine = {"scorer": 1.0}
    one, two = load_config(None, []), load_config(None, [])
    one.teacher.resources["gpu_pool"] = 1.0
    assert two.teacher.resources == {} and one.reference.resources == {}
    assert TVKDConfig().teacher.resources == {}
    assert TeacherConfig(resources=mine).resources is not mine
    with pytest.raises(ConfigError, match=r"CPU: 2 disagrees with train.num_cpus_per_worker=3"):
        load_config(None, ["train.num_cpus_per_worker=3", "train.resources_per_worker={CPU: 2}"])


def test_pool_errors_name_their_own_section():
    with pytest.raises(ConfigError, match=r"^reference.num_actors: must be >= 1, got 0$"):
        load_config(None, ["reference.num_actors=0"])
    with pytest.raises(ConfigError, match=r"^teacher.max_restarts: must be >= 0$"):
        load_config(None, ["teacher.max_restarts=-1"])


def test_default_yaml_is_the_dataclass_defaults():
    """examples/default.yaml writes out the embedded default: every key it sets is the default,
    so the two cannot drift apart."""
    written = yaml.safe_load((REPO / "examples" / "default.yaml").read_text())
    defaults = TVKDConfig().to_dict()
    for section, values in written.items():
        for key, value in values.items():
            assert defaults[section][key] == value, f"{section}.{key}"
    assert load_config(REPO / "examples" / "default.yaml").to_dict() == defaults


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  alpha: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_is_documented_and_reference_is_current():
    for key, _typ, _default, help_text in field_docs():
        assert len(help_text) > 10, key
    generated = config_reference_markdown()
    assert (REPO / "docs" / "CONFIG.md").read_text() == generated, "run `make docs`"


def test_yaml_round_trip():
    cfg = load_config(None, ["loss.alpha=0.7", "run.name=x"])
    assert cfg != load_config()
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_every_example_config_loads():
    configs = sorted(p for p in (REPO / "examples").glob("*.yaml") if p.name != "runtime_env.yaml")
    assert len(configs) >= 8
    for path in configs:
        load_config(path)
    pools_example = load_config(REPO / "examples" / "cluster_pools.yaml")
    assert pools_example.teacher.resources == pools_example.reference.resources == {"scorer": 1}
    assert pools_example.train.resources_per_worker == {"trainer": 1}


def test_nested_overrides_and_yaml_build_the_lora_section(tmp_path):
    from_flags = load_config(None, ["student.lora.r=8", "student.lora.target_modules=[q_proj]"])
    path = tmp_path / "lora.yaml"
    path.write_text("student:\n  lora: {r: 8, target_modules: [q_proj]}\n")
    from_yaml = load_config(path)
    assert from_flags.student.lora == from_yaml.student.lora
    assert (from_flags.student.lora.r, from_flags.student.lora.alpha) == (8, 32.0)
    # The config travels to the workers as a dict: the section comes back as itself.
    assert config_from_dict(from_flags.to_dict()).student.lora == from_flags.student.lora
    assert load_config(None, []).student.lora is None
