"""Secure defaults (SPEC §8): no remote code, no pickles, servers on 127.0.0.1, lean job uploads."""

import re
from pathlib import Path

import yaml

from tvkd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("tvkd_ray", "actors", "jobs", "examples") for p in (REPO / d).rglob("*.py")]
DOCS_AND_SCRIPTS = [
    REPO / "README.md",
    REPO / "Makefile",
    *(REPO / "docs").glob("*.md"),
    *(REPO / "examples").glob("*.yaml"),
    *SOURCES,
]


def test_trust_remote_code_is_off_unless_configured():
    cfg = load_config()
    assert cfg.student.trust_remote_code is False
    assert load_config(None, ["student.trust_remote_code=true"]).student.trust_remote_code


def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
        for banned in ("pickle.load", "allow_pickle=True", "use_safetensors=False"):
            if banned in text:
                offenders.append(f"{path}: {banned}")
    assert not offenders, offenders


def test_servers_in_docs_and_scripts_bind_localhost():
    lines = []
    for path in DOCS_AND_SCRIPTS:
        for line in path.read_text().splitlines():
            if re.search(r"ray start --head|mlflow (ui|server) --", line):
                lines.append((path, line))
    assert lines, "no server command found to check"
    for path, line in lines:
        assert "127.0.0.1" in line, f"{path}: {line.strip()}"
        assert "0.0.0.0" not in line, f"{path}: {line.strip()}"


def test_job_runtime_env_keeps_git_outputs_caches_and_venvs_out():
    env = yaml.safe_load((REPO / "examples" / "runtime_env.yaml").read_text())
    excludes = set(env["excludes"])
    for needed in (".git", ".venv", "outputs", "mlruns", "**/__pycache__", ".pytest_cache"):
        assert needed in excludes, needed
    from ray._private.runtime_env.packaging import _get_excludes  # what Ray applies on upload

    match = _get_excludes(REPO, list(excludes))
    for path in (".git/HEAD", ".venv/bin/python", "outputs/x", "tvkd_ray/__pycache__/a.pyc"):
        assert match(REPO / path), path
    assert not match(REPO / "tvkd_ray" / "loss.py")
