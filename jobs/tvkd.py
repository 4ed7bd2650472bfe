"""tvkd-ray's command line (SPEC §5).

    python jobs/tvkd.py                              # the embedded default, end to end, locally
    python jobs/tvkd.py --config examples/tiny.yaml --train.max_steps 4 --loss.alpha 0.5
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tvkd.py --config examples/tiny.yaml --run.output_dir /abs/path

Bad input ends with one ``error: ...`` line and exit status 2; ``--debug`` shows the traceback.
``--verbose`` shows everything Ray, Ray Data, Ray Train, MLflow and transformers print.
"""

from __future__ import annotations

import logging
import signal
import sys
import textwrap
from pathlib import Path

# Runs as a script from a checkout or a Ray job's working directory: make the packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tvkd_ray.config import field_docs, load_config  # noqa: E402
from tvkd_ray.errors import TVKDError  # noqa: E402

USAGE = """usage: python jobs/tvkd.py [--config FILE.yaml] [--section.key VALUE ...]
                          [--print-config] [--verbose] [--debug] [--help]"""


def _help() -> str:
    lines = [USAGE, "", (__doc__ or "").strip(), "", "configuration (section.key  default):"]
    for key, _typ, default, help_text in field_docs():
        lines.append(f"  --{key}  (default: {default!r})")
        lines += textwrap.wrap(help_text, 92, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def parse_args(argv: list[str]) -> tuple[str | None, list[str], dict[str, bool]]:
    """(config path, ``section.key=value`` overrides, flags) from the command line."""
    config_path = None
    overrides: list[str] = []
    flags = {"print_config": False, "debug": False, "verbose": False, "help": False}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg in ("--print-config", "--debug", "--verbose"):
            flags[arg[2:].replace("-", "_")] = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            elif args:
                config_path = args.pop(0)
            else:
                raise TVKDError("--config needs a file path")
        elif arg.startswith("--") and "." in arg:
            key, sep, value = arg[2:].partition("=")
            if not sep:
                if not args or (args[0].startswith("--") and "." in args[0]):
                    raise TVKDError(f"--{key} needs a value")
                value = args.pop(0)
            overrides.append(f"{key}={value}")
        else:
            raise TVKDError(f"unexpected argument {arg!r}; see --help")
    return config_path, overrides, flags


def _interrupt_on_sigterm() -> None:
    """SIGTERM (e.g. a scheduler stopping the job) unwinds like Ctrl-C, so Ray shuts down."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _interrupt_on_sigterm()
    debug = "--debug" in argv
    verbose = "--verbose" in argv
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        config_path, overrides, flags = parse_args(argv)
        if flags["help"]:
            print(_help())
            return 0
        cfg = load_config(config_path, overrides)
        if flags["print_config"]:
            print(cfg.to_yaml(), end="")
            return 0
        from tvkd_ray import runtime

        if flags["verbose"]:
            runtime.make_verbose()
        import ray.data

        from tvkd_ray import fit

        # The CLI owns its process: the driver's [tvkd] lines, not Ray Data's progress bars.
        ray.data.DataContext.get_current().enable_progress_bars = flags["verbose"]
        result = fit(cfg)
    except TVKDError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; rerun the same command to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    from tvkd_ray.tracking import mlflow_ui_command

    print()
    print(f"run directory : {result.run_dir}")
    print(f"model         : {result.model_dir}")
    print(f"checkpoint    : {result.checkpoint_dir}")
    shown = ("loss", "eval/loss", "eval/rewards/accuracies", "eval/tvkd/shaped_accuracies")
    for key in shown:
        if key in result.metrics:
            print(f"{key:<28}: {result.metrics[key]:.4f}")
    if result.tracking_uri:
        print(f"MLflow run    : {result.mlflow_run_id}")
        print(f"view it with  : {mlflow_ui_command(result.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
