"""Model loading on CPU: presets (tiny, SmolLM2 from GGUF), students, tokenizer checks, security."""

import importlib.util
import os

# Nothing may come from the Hugging Face hub; set before transformers reads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM

from tvkd_ray.errors import ModelError
from tvkd_ray.models import (
    _materialise,
    _smollm2_gguf,
    build_student,
    check_device_map,
    check_tokenizers_compatible,
    load_model,
    load_tokenizer,
    resolve_model,
)

SMOLLM2 = "smollm2-135m-instruct"
ENGLISH = "The children walked to the park after school and played football with their friends."


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One preset cache for this module, so the SmolLM2 conversion runs once per test run."""
    root = tmp_path_factory.mktemp("tvkd-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TVKD_CACHE_DIR", str(root))
        yield root


def _mean_token_loss(model, ids: list[int]) -> float:
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids, labels=input_ids).loss.item()


# --- SmolLM2 teacher --------------------------------------------------------------------------


def test_smollm2_preset_loads_offline_prefers_natural_text_and_matches_gguf():
    model = load_model(SMOLLM2)
    tokenizer = load_tokenizer(SMOLLM2)
    assert model.dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert not hasattr(model.config, "quantization_config")

    ids = tokenizer(ENGLISH)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()

    shuffled = list(ids)
    random.Random(0).shuffle(shuffled)
    assert shuffled != ids
    natural_loss, shuffled_loss = _mean_token_loss(model, ids), _mean_token_loss(model, shuffled)
    assert natural_loss + 2.0 < shuffled_loss, (natural_loss, shuffled_loss)

    # The reload from the safetensors cache gives exactly the logits of the GGUF conversion.
    gguf = _smollm2_gguf()
    converted = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        assert torch.equal(converted(torch.tensor([ids])).logits, logits)


def test_smollm2_and_tiny_tokenizers_are_incompatible():
    teacher, student = f"teacher tokenizer '{SMOLLM2}'", "student tokenizer 'tiny'"
    with pytest.raises(ModelError, match=f"{teacher} .*49152.*{student} .*1024.*vocabulary size"):
        check_tokenizers_compatible(
            load_tokenizer(SMOLLM2), load_tokenizer("tiny"), teacher, student
        )


def test_same_vocab_size_but_different_encoding_is_incompatible():
    tokenizer, other = load_tokenizer("tiny"), load_tokenizer("tiny")
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert len(tokenizer) == len(other)
    with pytest.raises(ModelError, match="^teacher .*and student .*differ in the probe encoding"):
        check_tokenizers_compatible(tokenizer, other, "teacher", "student")


# --- tiny presets -----------------------------------------------------------------------------


def test_tiny_presets_are_deterministic_and_load(tmp_path, monkeypatch):
    builds = []
    for name in ("a", "b"):
        monkeypatch.setenv("TVKD_CACHE_DIR", str(tmp_path / name))
        builds.append({p: Path(resolve_model(p)) for p in ("tiny-teacher", "tiny-student")})
    first, second = builds
    for preset in ("tiny-teacher", "tiny-student"):
        assert first[preset] != second[preset]
        for file in ("tokenizer.json", "config.json"):
            assert (first[preset] / file).read_text() == (second[preset] / file).read_text()
        weights_a = load_file(first[preset] / "model.safetensors")
        weights_b = load_file(second[preset] / "model.safetensors")
        assert weights_a.keys() == weights_b.keys()
        assert all(torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    # Teacher and student share one tokenizer but not weights.
    teacher_tok = (first["tiny-teacher"] / "tokenizer.json").read_text()
    assert teacher_tok == (first["tiny-student"] / "tokenizer.json").read_text()

    teacher, student = load_model("tiny-teacher"), load_model("tiny-student")
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size) == (4, 128)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 64)
    ids = torch.tensor([load_tokenizer("tiny")(ENGLISH)["input_ids"]])
    with torch.no_grad():
        for model in (teacher, student):
            logits = model(ids).logits
            assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits).all()


def test_tiny_tokenizer_round_trips_unicode_and_renders_chat():
    tokenizer = load_tokenizer("tiny")
    assert len(tokenizer) == 1024
    for text in ["\n\nHuman: hi\n\nAssistant: 42!", "naïve café 東京 🙂\t ünïcödé  ", "x" * 300]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    messages = [{"role": "user", "content": "Plant a tree?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nPlant a tree?<|im_end|>\n<|im_start|>assistant\n"


def test_materialise_keeps_the_winner_when_a_concurrent_build_renames_first(tmp_path):
    target = tmp_path / "model"

    def write(tag: str):
        def build(out_dir: Path) -> None:
            (out_dir / "config.json").write_text(json.dumps({"tag": tag}))
            (out_dir / "model.safetensors").write_text(tag)

        return build

    def loser(out_dir: Path) -> None:
        write("loser")(out_dir)
        _materialise(target, write("winner"))  # another process finishes while we build

    assert _materialise(target, loser) == target
    assert json.loads((target / "config.json").read_text()) == {"tag": "winner"}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp dirs left behind


# --- students ---------------------------------------------------------------------------------


def test_pretrained_student_copies_the_first_layers_and_shares_the_tokenizer(tmp_path):
    out_dir = build_student("tiny-teacher", str(tmp_path / "student"), num_layers=2)
    teacher, student = load_model("tiny-teacher"), load_model(out_dir)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    teacher_params, student_params = dict(teacher.named_parameters()), student.named_parameters()
    student_params = dict(student_params)
    assert student_params.keys() < teacher_params.keys()
    for name in [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ]:
        assert torch.equal(student_params[name], teacher_params[name]), name
    assert torch.equal(student.get_output_embeddings().weight, teacher.lm_head.weight)
    check_tokenizers_compatible(load_tokenizer("tiny-teacher"), load_tokenizer(out_dir), "t", "s")

    # A complete student directory is reused; a different depth is refused.
    assert build_student("tiny-teacher", out_dir, num_layers=2) == out_dir
    with pytest.raises(ModelError, match="already holds a 2-layer model"):
        build_student("tiny-teacher", out_dir, num_layers=3)


def test_from_config_student_is_random_and_seeded(tmp_path):
    out_a = build_student("tiny-teacher", str(tmp_path / "a"), init="from_config", seed=3)
    out_b = build_student("tiny-teacher", str(tmp_path / "b"), init="from_config", seed=3)
    teacher, student_a, student_b = load_model("tiny-teacher"), load_model(out_a), load_model(out_b)
    assert student_a.config.num_hidden_layers == 4  # None keeps the teacher's depth
    weight = "model.layers.0.self_attn.q_proj.weight"
    teacher_w, a_w, b_w = (m.state_dict()[weight] for m in (teacher, student_a, student_b))
    assert not torch.equal(a_w, teacher_w)
    assert torch.equal(a_w, b_w)
    check_tokenizers_compatible(load_tokenizer("tiny"), load_tokenizer(out_a), "t", "s")


# --- errors and security ----------------------------------------------------------------------


def test_missing_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="no-such-model.*does not exist"):
        load_model(missing)
    with pytest.raises(ModelError, match="no-such-model.*does not exist"):
        load_tokenizer(missing)


def test_unknown_name_offline_lists_presets_and_asks_for_a_local_path():
    with pytest.raises(ModelError) as err:
        resolve_model("some-org/some-model")
    message = str(err.value)
    assert "'some-org/some-model'" in message and "local path" in message
    assert "tiny-teacher" in message and SMOLLM2 in message


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_flash_attention_without_the_package_names_it():
    with pytest.raises(ModelError, match="tiny-student.*flash_attention_2 needs the flash-attn"):
        load_model("tiny-student", attn_implementation="flash_attention_2")


def test_device_map_must_name_modules_and_place_every_weight():
    teacher = resolve_model("tiny-teacher")
    check_device_map(teacher, {"model": "cpu", "lm_head": "disk"}, "teacher.device_map")
    with pytest.raises(ModelError, match=r"teacher.device_map.lmhead: .*no module.*lm_head"):
        check_device_map(teacher, {"model": "cpu", "lmhead": "cpu"}, "teacher.device_map")
    with pytest.raises(ModelError, match="gives no device to model.embed_tokens.weight and"):
        check_device_map(teacher, {"lm_head": "cpu"}, "teacher.device_map")


class _Exploit:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.mkdir, (str(self.sentinel),)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    tiny = Path(resolve_model("tiny-teacher"))
    (model_dir / "config.json").write_text((tiny / "config.json").read_text())
    sentinel = tmp_path / "pickle-ran"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(sentinel)))
    with pytest.raises(ModelError, match="pickled.*no safetensors.*pytorch_model.bin"):
        load_model(str(model_dir))
    assert not sentinel.exists()


def test_remote_code_is_not_trusted_by_default(tmp_path):
    model_dir = tmp_path / "remote"
    model_dir.mkdir()
    sentinel = tmp_path / "remote-code-ran"
    (model_dir / "remote_model.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    config = {
        "model_type": "tvkd-remote",
        "auto_map": {
            "AutoConfig": "remote_model.RemoteConfig",
            "AutoModelForCausalLM": "remote_model.RemoteModel",
        },
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    tiny = Path(resolve_model("tiny-teacher"))
    (model_dir / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="remote.*custom code"):
        load_model(str(model_dir))
    assert not sentinel.exists()
