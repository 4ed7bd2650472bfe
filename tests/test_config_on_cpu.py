"""Config: YAML + dotted overrides, documented fields, one-line errors for bad input."""

from pathlib import Path

import pytest
import yaml

from tvkd_ray.config import (
    TVKDConfig,
    config_from_dict,
    config_reference_markdown,
    field_docs,
    load_config,
)
from tvkd_ray.errors import ConfigError

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
    assert not cfg.uses_teacher and cfg.alpha == 0.0


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
