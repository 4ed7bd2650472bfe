"""What a run reads before any Ray work: the tokenizers (checked against each other), the models
(resolved to local directories, the student's initial weights built) and every data row
(validated and shuffled on the driver)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from tvkd_ray.config import TVKDConfig
from tvkd_ray.data import load_pairs
from tvkd_ray.errors import ConfigError, DataError
from tvkd_ray.models import (
    build_student,
    check_device_map,
    check_lora_targets,
    check_offsets,
    check_tokenizers_compatible,
    load_tokenizer,
    resolve_model,
    tokenizer_difference,
)


@dataclass
class ModelPaths:
    """Local directories of every model the run uses (presets materialised, student built)."""

    student_init: str
    reference: str
    tokenizer: str
    teacher: str | None = None
    teacher_ref: str | None = None
    # The teacher has its own tokenizer: its potentials are mapped to the student's tokens.
    cross_tokenizer: bool = False


@dataclass(frozen=True)
class Tokenizers:
    """The student's tokenizer, and the teacher's when it differs (its potentials are then
    mapped to the student's tokens, SPEC §2.3c): decided once, in ``check_tokenizers``."""

    student: Any
    teacher_own: Any | None = None

    @property
    def cross(self) -> bool:
        return self.teacher_own is not None


@dataclass
class PairData:
    """Validated, shuffled pair tables, ready to be tokenised and scored."""

    train: pa.Table
    eval: pa.Table | None
    report: dict[str, Any] = field(default_factory=dict)


def check_tokenizers(cfg: TVKDConfig) -> Tokenizers:
    """Load the student's tokenizer and check the others against it (SPEC §4), before any model
    work: the reference shares it; a teacher with its own tokenizer is mapped (SPEC §2.3c), which
    needs offsets from both and no top-k term; the teacher's ref_model shares the teacher's."""
    student_name = cfg.student.tokenizer or cfg.student.model
    student_tok = load_tokenizer(student_name)
    student = f"student tokenizer '{student_name}'"
    if cfg.reference.model is not None:
        name = cfg.reference.model
        check_tokenizers_compatible(
            load_tokenizer(name), student_tok, f"reference tokenizer '{name}'", student
        )
    if not cfg.uses_teacher:
        return Tokenizers(student_tok)
    teacher_tok, teacher = (
        load_tokenizer(cfg.teacher.model),
        f"teacher tokenizer '{cfg.teacher.model}'",
    )
    if cfg.teacher_potential == "implicit_reward":
        name = cfg.teacher.ref_model
        check_tokenizers_compatible(
            load_tokenizer(name), teacher_tok, f"teacher.ref_model tokenizer '{name}'", teacher
        )
    _check_top_k(cfg, teacher_tok)
    difference = tokenizer_difference(teacher_tok, student_tok)
    if difference is None:
        if cfg.uses_top_k:
            _check_head_sizes(resolve_model(cfg.teacher.model), resolve_model(cfg.student.model))
        return Tokenizers(student_tok)
    if cfg.loss.kd_weight > 0:
        raise ConfigError(
            f"loss.kd_weight: top-k KD needs one vocabulary, but {teacher} and {student} "
            f"differ in {difference}; set loss.kd_weight: 0, or use a teacher with the "
            "student's tokenizer"
        )
    if cfg.loss.objective == "release":
        raise ConfigError(
            f"loss.objective: release scores the student on the teacher's top-k ids, which "
            f"needs one vocabulary, but {teacher} and {student} differ in {difference}; use "
            "loss.objective: tvkd, or a teacher with the student's tokenizer"
        )
    check_offsets(teacher_tok, teacher, student)
    check_offsets(student_tok, student, teacher)
    return Tokenizers(student_tok, teacher_tok)


def _check_top_k(cfg: TVKDConfig, teacher_tok) -> None:
    """teacher.top_k must leave a rest bucket: fewer tokens than the teacher's vocabulary."""
    if (cfg.uses_top_k or cfg.loss.sums_top_k) and cfg.teacher.top_k >= len(teacher_tok):
        raise ConfigError(
            f"teacher.top_k: {cfg.teacher.top_k} must be smaller than the teacher's vocabulary "
            f"({len(teacher_tok)} tokens), so that a rest bucket remains"
        )


def check_student(cfg: TVKDConfig) -> None:
    """The student's LoRA targets exist in its base model (whose layers the student keeps)."""
    if cfg.student.lora is not None:
        check_lora_targets(resolve_model(cfg.student.model), cfg.student.lora)


def prepare_models(cfg: TVKDConfig, tokenizers: Tokenizers) -> ModelPaths:
    """Resolve every model to a local directory and build the student's initial weights."""
    student_init = build_student(
        cfg.student.model,
        str(cfg.run_dir / "student_init"),
        num_layers=cfg.student.num_layers,
        init=cfg.student.init,
        seed=cfg.run.seed,
    )
    paths = ModelPaths(
        student_init=student_init,
        reference=resolve_model(cfg.reference.model) if cfg.reference.model else student_init,
        tokenizer=resolve_model(cfg.student.tokenizer) if cfg.student.tokenizer else student_init,
    )
    if cfg.uses_teacher:
        paths.teacher = resolve_model(cfg.teacher.model)
        paths.cross_tokenizer = tokenizers.cross
        if cfg.teacher_potential == "implicit_reward":
            paths.teacher_ref = resolve_model(cfg.teacher.ref_model)
    _check_device_maps(cfg, paths)
    return paths


def _check_head_sizes(teacher_dir: str, student_dir: str) -> None:
    """The teacher's top-k ids index the student's LM head: both heads need as many rows (one
    tokenizer can sit on heads padded to different sizes, as in the sizes of one family)."""
    from transformers import AutoConfig

    rows = [
        AutoConfig.from_pretrained(d).get_text_config().vocab_size
        for d in (teacher_dir, student_dir)
    ]
    if rows[0] != rows[1]:
        raise ConfigError(
            f"teacher.model: top-k KD and loss.objective=release index the student's LM head "
            f"with the teacher's token ids, but the teacher's head has {rows[0]} rows and the "
            f"student's {rows[1]}; use a teacher and a student with one head size, or neither "
            "term (loss.kd_weight: 0, loss.objective: tvkd)"
        )


def _check_device_maps(cfg: TVKDConfig, paths: ModelPaths) -> None:
    """Each pool's device_map fits its models (the teacher's applies to its ref_model too)."""
    models = {"teacher": [paths.teacher, paths.teacher_ref], "reference": [paths.reference]}
    for section, pool in cfg.pools().items():
        for model_dir in filter(None, models[section] if pool.device_map else []):
            check_device_map(model_dir, pool.device_map, f"{section}.device_map")


def load_data(
    cfg: TVKDConfig, tokenizers: Tokenizers, train_dataset=None, eval_dataset=None
) -> PairData:
    """Read and validate every pair (SPEC §4) before any model or Ray work; a bad row stops the
    run here, naming its file, row and field."""
    tokenizer = tokenizers.student
    train_source = train_dataset if train_dataset is not None else cfg.data.train_path
    if train_source is None:
        raise ConfigError("data.train_path: no training data (set it or pass train_dataset)")
    train, report = _source_table(cfg, train_source, tokenizer)
    if report["format"] == "conversational" and tokenizers.cross:
        _check_rendering(cfg, tokenizers, report["source"])
    eval_table = None
    eval_source = eval_dataset if eval_dataset is not None else cfg.data.eval_path
    if eval_source is not None:
        eval_table, eval_report = _source_table(cfg, eval_source, tokenizer)
        report.update({f"eval_{k}": v for k, v in eval_report.items()})
        _check_same_format(report, eval_report)
    # A fixed shuffle (run.seed) so resumed and repeated runs see the same order.
    train = train.take(pa.array(np.random.default_rng(cfg.run.seed).permutation(train.num_rows)))
    if eval_table is None and cfg.data.eval_fraction > 0:
        n_eval = max(1, int(round(train.num_rows * cfg.data.eval_fraction)))
        eval_table, train = train.slice(0, n_eval), train.slice(n_eval)
    return PairData(train=train, eval=eval_table, report=report)


def _source_table(cfg: TVKDConfig, source, tokenizer) -> tuple[pa.Table, dict[str, Any]]:
    loaded = load_pairs(
        source, format=cfg.data.format, tokenizer=tokenizer, on_invalid=cfg.data.on_invalid
    )
    report = {"source": loaded.source, "format": loaded.format, "pairs": loaded.table.num_rows}
    report.update({f"skipped/{reason}": n for reason, n in loaded.skipped.items()})
    return loaded.table, report


# A conversation both chat templates must render alike for a teacher with its own tokenizer.
PROBE_CONVERSATION = [
    {"role": "user", "content": "How many legs does a cat have?"},
    {"role": "assistant", "content": "Four."},
]


def _check_rendering(cfg: TVKDConfig, tokenizers: Tokenizers, source: str) -> None:
    """Conversational rows are rendered by the student's chat template, and a teacher with its
    own tokenizer scores that same text (SPEC §2.3c): its own template must render it alike."""

    def render(tokenizer) -> str | None:
        if tokenizer.chat_template is None:
            return None
        return tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False)

    if render(tokenizers.teacher_own) != render(tokenizers.student):
        student_name = cfg.student.tokenizer or cfg.student.model
        raise DataError(
            f"{source}: conversational rows are rendered with one chat template for both models, "
            f"but teacher tokenizer '{cfg.teacher.model}' and student tokenizer "
            f"'{student_name}' render them differently; use prompt/chosen/rejected text rows "
            "(data.format: standard), or tokenizers with the same chat template"
        )


def _check_same_format(train_report: dict, eval_report: dict) -> None:
    if train_report["format"] != eval_report["format"]:
        raise DataError(
            f"{eval_report['source']}: eval data is in {eval_report['format']} format but the "
            f"training data ({train_report['source']}) is {train_report['format']}; "
            "use one format (or set data.format explicitly)"
        )
