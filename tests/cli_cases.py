"""Runs the CLI's ``main`` on many command lines in one process, for the bad-input catalogue:
``python tests/cli_cases.py CASES.json OUT.json``. Each case gets what a shell would see of
``python jobs/tvkd.py ARGS``: its exit status, its stderr, and whether an exception escaped (a
bare traceback). One process pays the imports once instead of once per case."""

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import tvkd  # noqa: E402


def run_case(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    escaped = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = tvkd.main(argv)
        except SystemExit as exc:
            status = exc.code
        except BaseException:  # what the real CLI would end in: a traceback
            status, escaped = 1, traceback.format_exc()
    stderr = err.getvalue() + (escaped or "")
    return {"argv": argv, "returncode": status, "stdout": out.getvalue(), "stderr": stderr}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps([run_case(argv) for argv in cases]))
