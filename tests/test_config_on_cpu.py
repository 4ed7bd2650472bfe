"""Config: YAML + dotted overrides, documented fields, one-line errors for bad input."""

from pathlib import Path

import pytest
import yaml

from driver import pools
from driver.inputs import ModelPaths
from driver.streams import rows_per_block
from tvkd_ray.config import (
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
        (["run.stage=ppo"], "run.stage: must be one of tvkd | dpo | sft, got 'ppo'"),
        (["teacher.model=null"], "teacher.model: run.stage=tvkd needs a teacher model"),
        (
            ["loss.potential=implicit_reward"],
            "teacher.ref_model: loss.potential=implicit_reward needs",
        ),
        (["run.stage=dpo", "loss.kd_weight=0.5"], "loss.kd_weight: needs teacher outputs"),
        (["data.max_prompt_length=300"], "data.max_prompt_length: must be in (0, data.max_length"),
        (["loss.alpha"], "must look like section.key=value"),
    ],
)
def test_bad_config_gives_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_dpo_stage_needs_no_teacher():
    cfg = load_config(None, ["run.stage=dpo", "teacher.model=null"])
    assert not cfg.uses_teacher and Objective.from_config(cfg).alpha == 0.0
    assert list(cfg.pools()) == ["reference"]
    assert list(load_config(None, ["run.stage=sft"]).pools()) == []


def test_pools_own_their_knobs_and_inherit_the_students_model_settings():
    """Each pool's dtype / trust_remote_code is the student's unless it sets its own, its
    restarts are its own, and the streamed block size never comes from a pool that does not
    run."""
    paths = ModelPaths(student_init="s", reference="r", tokenizer="s", teacher="t")
    cfg = load_config(None, ["student.dtype=bfloat16", "reference.max_restarts=7"])
    specs = {role.name: role for role in pools.roles(cfg, paths)}
    assert specs["teacher"].spec.dtype == specs["reference"].spec.dtype == "bfloat16"
    assert specs["reference"].pool.max_restarts == 7 and specs["teacher"].pool.max_restarts == 3
    own = load_config(None, ["teacher.dtype=float32", "teacher.trust_remote_code=true"])
    teacher, reference = pools.roles(own, paths)
    assert (teacher.spec.dtype, teacher.spec.trust_remote_code) == ("float32", True)
    assert (reference.spec.dtype, reference.spec.trust_remote_code) == ("auto", False)
    dpo = load_config(None, ["run.stage=dpo", "teacher.batch_size=64", "reference.batch_size=4"])
    assert rows_per_block(dpo) == 4
    assert rows_per_block(load_config(None, ["run.stage=sft", "train.batch_size=5"])) == 5


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
