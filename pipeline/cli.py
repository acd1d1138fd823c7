"""Command line: parse, validate, call one function, print the report.

Heavy libraries (vLLM, torch) are imported only inside ``run``, so ``--help`` and
``stats`` start at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from pipeline import __version__
from pipeline.config import STATS_SECTIONS
from pipeline.errors import PipelineError, environment_problem
from pipeline.resources import shipped_config_names
from pipeline.terminal import configure as configure_terminal

_EPILOG_RUN = """examples:
  entropy-pipeline run
  entropy-pipeline run --config configs/default.yaml --out runs/try sampling.num_samples=16
  entropy-pipeline run --out runs/try          # again: resumes, redoing only missing shards
"""
_EPILOG_HISTORY = """examples:
  entropy-pipeline history runs
  entropy-pipeline history runs --table nightly.parquet --plot nightly.png
"""
_EPILOG_STATS = """examples:
  entropy-pipeline stats runs/try entropy.unit=per_token entropy.include_eos=false
"""
_EPILOG_CONFIG = """examples:
  entropy-pipeline config                          # the default config, resolved
  entropy-pipeline config --config gpu engine.enforce_eager=true > my.yaml
  entropy-pipeline config --reference              # every setting: type, default, meaning
"""


def _config_file(value: str) -> Path:
    """``--config``: a YAML file, or the name of a shipped config (``default``, ``gpu``)."""
    from pipeline.resources import config_argument

    try:
        return config_argument(value)
    except PipelineError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _settings_help(sections: tuple[str, ...] | None = None) -> str:
    """The settings (all, or those of ``sections``) with their descriptions, for --help."""
    from pipeline.config_reference import options_help

    return "\nsettings (key=value; `entropy-pipeline config --reference` as a table):\n" + (
        options_help(sections)
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entropy-pipeline",
        description="Measure how a training step p0 -> p1 changed a language model's "
        "entropy: sample from p0 with vLLM, teacher-force under p0 and p1, estimate "
        "H(p0), H(p1) and delta H by self-normalised importance sampling.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="sample, score and compute statistics into a run directory",
        epilog=_EPILOG_RUN + _settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    others = [name for name in shipped_config_names() if name != "default"]
    config_help = (
        "YAML config file, or the name of a shipped config: default (the embedded "
        f"demo, used when --config is left out), {', '.join(others)}"
    )
    run.add_argument("--config", type=_config_file, default=None, help=config_help)
    run.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory; an existing one is resumed, redoing only missing or "
        "damaged shards (default: runs/date=<date>/run=<time>-<config hash>)",
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="when resuming with other inputs, redo the stages that differ instead of refusing",
    )
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, e.g. entropy.unit=per_token",
    )
    stats = commands.add_parser(
        "stats",
        help="recompute summary.json of a finished run with other statistics options",
        epilog=_EPILOG_STATS + _settings_help(STATS_SECTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stats.add_argument("run_dir", type=Path, help="a run directory written by `run`")
    stats.add_argument(
        "overrides",
        nargs="*",
        metavar="entropy.key=value",
        help="entropy options, e.g. entropy.include_eos=false",
    )
    history = commands.add_parser(
        "history",
        help="gather the summaries of all runs under a folder into one table and plot",
        epilog=_EPILOG_HISTORY,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    history.add_argument("runs_root", type=Path, help="folder holding run directories")
    history.add_argument(
        "--table",
        type=Path,
        default=None,
        help="Parquet file to write (default: RUNS_ROOT/history.parquet)",
    )
    history.add_argument(
        "--plot", type=Path, default=None, help="PNG file to write (default: RUNS_ROOT/history.png)"
    )
    for sub in (run, stats):
        sub.add_argument(
            "--json", action="store_true", help="print summary.json instead of the table"
        )
    config = commands.add_parser(
        "config",
        help="print the resolved config as YAML, or with --reference every setting",
        epilog=_EPILOG_CONFIG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument("--config", type=_config_file, default=None, help=config_help)
    config.add_argument(
        "--reference",
        action="store_true",
        help="print every setting (key, type, default, meaning) as a Markdown table",
    )
    config.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides, applied as `run` applies them",
    )
    debug_help = "on an error, print the traceback as well as the one-line message"
    verbose_help = (
        "also show the libraries' output (vLLM, torch, transformers log lines, C++ "
        "warnings, weight-loading bars); run.log keeps their log lines either way"
    )
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    for sub in commands.choices.values():
        # Also after the command; SUPPRESS keeps a flag given before the command.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        sub.add_argument(
            "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
        )
    return parser


def _print_config(config_file: Path | None, overrides: list[str], reference: bool) -> int:
    """Print the resolved config as YAML (with its hash), or the settings reference."""
    if reference:
        from pipeline.config_reference import reference_table

        print(reference_table(), end="")
        return 0
    import yaml

    from pipeline.config import DEFAULT_CONFIG, config_hash, load_config

    config = load_config(config_file, overrides)  # errors: one line, from main()
    # Paths are printed resolved (absolute), so the output runs from any folder.
    print(f"# resolved from {config_file or DEFAULT_CONFIG}; config hash {config_hash(config)}")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _history(runs_root: Path, table: Path | None, plot: Path | None) -> int:
    from pipeline.artifacts import write_table
    from pipeline.history import check_output_path, format_history, gather_history, plot_history

    table = table or runs_root / "history.parquet"
    plot = plot or runs_root / "history.png"
    history = gather_history(runs_root)
    check_output_path(table, "--table")
    check_output_path(plot, "--plot")
    for run_dir, reason in history.skipped:
        print(f"entropy-pipeline: warning: skipped {run_dir}: {reason}.", file=sys.stderr)
    if history.table.is_empty():
        raise PipelineError(
            f"none of the {len(history.skipped)} run(s) under {runs_root} can be shown "
            "(reasons above)."
        )
    print(format_history(history.table))
    write_table(history.table.to_arrow(), table, {"content": "history"})
    plot_history(history.table, plot)
    print(f"\nhistory written to {table} and {plot}", file=sys.stderr)
    return 0


def _report_error(err: Exception, debug: bool) -> int:
    """Print ``err`` as one line (after its traceback with --debug); its exit status."""
    if debug:
        traceback.print_exception(err)
    if isinstance(err, OSError):
        err = environment_problem(err)
    if isinstance(err, PipelineError):
        message, status = str(err), err.exit_status
    else:
        lines = str(err).strip().splitlines()
        message = f"unexpected {type(err).__name__}" + (f": {lines[0]}" if lines else "")
        if not debug:
            message += " (run the command again with --debug to see the traceback)"
        status = 1
    print(f"entropy-pipeline: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``entropy-pipeline`` console script.

    Exit status: 0 success, 2 input error (config, prompts, models, run directory,
    options), 1 environment error (full disk, permissions) or an unexpected error,
    130 interrupted, 141 the reader of the output went away (``| head``: quietly, as
    command-line tools do). Every error is one line on stderr; ``--debug`` adds the
    traceback.
    """
    args = _parser().parse_args(argv)
    configure_terminal(verbose=args.verbose)
    try:
        return _command(args)
    except KeyboardInterrupt:
        print("\nentropy-pipeline: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Python flushes stdout once more at exit; pointed at /dev/null, that flush
        # cannot fail again with a second, noisier error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as err:  # every error ends as one line and an exit status
        return _report_error(err, args.debug)


def _command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors propagate to ``main``."""
    from pipeline.report import format_summary

    if args.command == "history":
        return _history(args.runs_root, args.table, args.plot)
    if args.command == "config":
        return _print_config(args.config, args.overrides, args.reference)
    run_dir = getattr(args, "out", None)
    try:
        if args.command == "run":
            from pipeline.config import load_config
            from pipeline.run import default_run_dir, run_pipeline

            if args.out is not None and args.out.exists() and not args.out.is_dir():
                raise PipelineError(
                    f"--out {args.out} is a file; --out names a run directory (a new "
                    "folder, or a run to resume)."
                )
            config = load_config(args.config, args.overrides)
            run_dir = args.out or default_run_dir(config)
            summary = run_pipeline(config, run_dir, force=args.force)
        else:
            from pipeline.run import run_stats

            run_dir = args.run_dir
            summary = run_stats(run_dir, args.overrides)
    except KeyboardInterrupt:
        print(
            "\nentropy-pipeline: interrupted. Finished shards are kept; resume with "
            f"`entropy-pipeline run --out {run_dir}` and the same config.",
            file=sys.stderr,
        )
        return 130
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    written = "summary.json, report.png" + (", run.log" if args.command == "run" else "")
    print(f"\n{written} written to {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
