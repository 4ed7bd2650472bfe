"""A teacher with its own tokenizer (SPEC §2.3c): student states take the potential of the teacher
state with the longest text prefix not past them. The worked example is docs/ARCHITECTURE.md's."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.teacher import TeacherPotentials, TeacherSpec
from tvkd_ray import alignment, schema
from tvkd_ray.data import load_pairs, tokenize_batch
from tvkd_ray.models import load_tokenizer, resolve_model

LENGTHS = {"max_length": 96, "max_prompt_length": 64}


def test_worked_example_where_the_boundaries_differ():
    """Response " No idea 😀." (11 characters, the emoji at 9). The student's byte-level tokens:
    " ", "N", "o", " ", "i", "d", "ea", " ", the emoji in four byte pieces, ".", EOS; the
    teacher's: " No", " idea", " ", the emoji, ".", EOS."""
    student_offsets = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 9)]
    student_offsets += [(9, 10)] * 4 + [(10, 11)]
    teacher_offsets = [(0, 3), (3, 8), (8, 9), (9, 10), (10, 11)]
    student = alignment.state_chars(student_offsets, 11, eos=True)
    teacher = alignment.state_chars(teacher_offsets, 11, eos=True)
    # The states inside the emoji have only the text before it: position 9.
    assert student.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9, 9, 9, 9, 10, 11]
    assert teacher.tolist() == [0, 3, 8, 9, 10, 11]
    index = alignment.align(teacher, student)
    assert index.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 5]
    phi = pa.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], pa.list_(pa.float32()))
    mapped = alignment.map_potentials(
        phi, pa.array([teacher.tolist()]), pa.array([student.tolist()])
    )
    assert mapped.to_pylist() == [
        [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0, 5.0, 6.0]
    ]


def test_a_truncated_response_never_takes_the_state_past_its_text():
    """Cut after " ok fi": the student has no EOS; the teacher (which always appends one) has its
    EOS state at the end of the text, past every student state."""
    student = alignment.state_chars([(0, 3), (3, 5), (5, 6)], 6, eos=False)
    teacher = alignment.state_chars([(0, 3), (3, 6)], 6, eos=True)
    assert alignment.align(teacher, student).tolist() == [0, 1, 1]


@given(st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_identical_states_map_each_to_itself(steps):
    """Ties included (a step of 0: a character cut into pieces): identical tokenizations map
    every state to itself."""
    chars = np.cumsum([0, *steps])
    assert alignment.align(chars, chars).tolist() == list(range(len(chars)))


TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(" \n\t"),
    min_size=1,
    max_size=60,
).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(prompt=TEXT, chosen=TEXT, rejected=TEXT)
def test_every_student_token_gets_one_teacher_state_in_order(prompt, chosen, rejected):
    if chosen == rejected:
        rejected += "!"
    student_tok, teacher_tok = (
        load_tokenizer("tiny-student"),
        load_tokenizer("smollm2-135m-instruct"),
    )
    pairs = pa.table(
        {"pair_id": [0], "prompt": [prompt], "chosen": [chosen], "rejected": [rejected]},
        schema=schema.PAIRS,
    )
    tokens = tokenize_batch(pairs, student_tok, max_length=48, max_prompt_length=24, align=True)
    _, teacher_chars = alignment.teacher_tokens(tokens, teacher_tok)
    for (text, chars), ids in zip(
        alignment.RESPONSE_COLUMNS, (schema.CHOSEN_IDS, schema.REJECTED_IDS)
    ):
        student = np.asarray(tokens[chars][0].as_py())
        teacher = np.asarray(teacher_chars[chars][0].as_py())
        index = alignment.align(teacher, student)
        assert len(index) == len(tokens[ids][0]) == len(student)  # one state per student token
        assert (np.diff(index) >= 0).all() and 0 <= index.min() and index.max() < len(teacher)
        assert (teacher[index] <= student).all()  # never a prefix past the student's state
        assert student.max() <= len(tokens[text][0].as_py())


@pytest.fixture(scope="module")
def tiny_pairs():
    return load_pairs("examples/data/bundled/train.jsonl").table.slice(0, 8)


@pytest.mark.parametrize("potential", ["soft_value", "implicit_reward"])
def test_mapping_between_identical_tokenizers_gives_the_direct_potentials(tiny_pairs, potential):
    """The mapped path of the teacher actor, run with the student's own tokenizer, returns the
    direct path's potentials bit for bit (and nothing else of the alignment)."""
    tokenizer = load_tokenizer("tiny-student")
    direct = tokenize_batch(tiny_pairs, tokenizer, **LENGTHS)
    aligned = tokenize_batch(tiny_pairs, tokenizer, **LENGTHS, align=True)
    extra = {"ref_model": resolve_model("tiny-student")} if potential == "implicit_reward" else {}
    teacher = TeacherPotentials(
        TeacherSpec(model=resolve_model("tiny-teacher"), potential=potential, **extra)
    )
    plain, mapped = teacher(direct), teacher(aligned)
    assert mapped.column_names == plain.column_names
    for column in schema.POTENTIALS:
        assert mapped[column].equals(plain[column])


def test_a_teacher_with_another_tokenizer_scores_every_student_token(tiny_pairs):
    tokens = tokenize_batch(tiny_pairs, load_tokenizer("tiny-student"), **LENGTHS, align=True)
    teacher = TeacherPotentials(TeacherSpec(model=resolve_model("smollm2-135m-instruct")))
    out = teacher(tokens)
    assert not set(schema.ALIGNMENT.names) & set(out.column_names)  # they stay in the actor
    for ids, column in zip((schema.CHOSEN_IDS, schema.REJECTED_IDS), schema.POTENTIALS):
        lengths = [len(row) for row in out[column].to_pylist()]
        assert lengths == [len(row) for row in out[ids].to_pylist()]
        assert np.isfinite(np.concatenate(out[column].to_pylist())).all()


@pytest.mark.e2e  # a whole fit; the mapping itself is tested above
@pytest.mark.slow
def test_fit_distils_a_teacher_with_another_tokenizer(ray_cluster, tmp_path, capsys):
    """The tiny student (its 1,024-token tokenizer) under the SmolLM2 teacher (49,152): the run
    says so once on the console and in a tag, and the shaping is live."""
    import mlflow

    import tvkd_ray
    from tvkd_ray.config import load_config
    from tvkd_ray.tracking import TOKENIZER_MAPPING_TAG

    cfg = load_config(
        "examples/tiny.yaml",
        [
            f"run.output_dir={tmp_path}",
            "run.name=cross",
            "teacher.model=smollm2-135m-instruct",
            "data.eval_path=null",
            "train.max_steps=2",
            "train.save_every=0",
        ],
    )
    result = tvkd_ray.fit(cfg)
    console = capsys.readouterr().out
    assert console.count("its potentials are mapped to the student's tokens") == 1
    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id)
    assert run.data.tags[TOKENIZER_MAPPING_TAG] == "char_offsets"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["tvkd/potential_mean"] != 0.0
    assert np.isfinite(run.data.metrics["tvkd/shaped_margins"])
    assert run.data.metrics["perf/teacher_bytes_per_token"] <= 8
