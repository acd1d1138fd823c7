"""Time and memory of ``entropy-pipeline stats`` at scale, next to a plain NumPy baseline.

Usage::

    python benchmarks/stats_scale.py [--sequences 10000000] [--repeats 3]
        [--replicates 1000] [--workdir DIR] [--samples-per-prompt 8] [--seed 0]
        [--timeout 1800] [--results benchmarks/RESULTS.md] [--cleanup]

1. Creates a synthetic run of ``--sequences`` sequences under ``--workdir`` with
   ``make_synthetic_run.py`` (or reuses it when its manifest says it is complete and
   was made with the same size, G and seed), then reads every file once so that both
   implementations start with the Parquet files in the page cache.
2. Runs, alternately and ``--repeats`` times each, (a) ``entropy-pipeline stats
   RUN_DIR uncertainty.estimand=population uncertainty.replicates=R`` (the cluster
   bootstrap, as the baseline computes) and (b) ``numpy_baseline.py RUN_DIR
   --replicates R``, each in a fresh process. The wall time is taken around the
   child; its peak resident set size and CPU time come from ``os.wait4`` (the
   kernel's rusage of exactly that child).
3. Compares the two implementations' figures (the polars ones read from the run's
   ``summary.json`` after each stats run), prints a table of medians and ratios
   (numpy / polars) and writes it, with the machine, data and library versions, to
   ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    MIB,
    argument_parser,
    entropy_pipeline_executable,
    machine_context,
    measure,
    pipeline_revision,
    tail,
    write_report,
)

HERE = Path(__file__).resolve().parent
GENERATOR = HERE / "make_synthetic_run.py"
BASELINE = HERE / "numpy_baseline.py"
PROFILER = HERE / "profile_stats.py"
POLARS, NUMPY = "polars", "numpy"
LABELS = {
    POLARS: "`entropy-pipeline stats` (Polars)",
    NUMPY: "`benchmarks/numpy_baseline.py` (NumPy)",
}
# Estimates that must agree to AGREEMENT_TOLERANCE (relative).
REQUIRED = ("H0_nats", "H1_nats", "delta_H_nats", "ess")
AGREEMENT_TOLERANCE = 1e-9
# Differences of nearly equal numbers: compared absolutely, not relatively.
ABSOLUTE_ONLY = ("identity_discrepancy_nats",)
# Python's version, then these libraries', go into the results file.
LIBRARIES = ("entropy-pipeline", "polars", "numpy", "pyarrow")
# Lines of a failed child's stderr that are kept.
TAIL_LINES = 15


@dataclass
class Measurement:
    """One child process: what ran, how long, how much memory, and its outcome."""

    name: str
    repeat: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    stderr_tail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def ensure_run(
    run_dir: Path, sequences: int, samples_per_prompt: int, seed: int, logs: Path
) -> dict[str, Any]:
    """Create the synthetic run, or reuse a complete one made with the same parameters.

    Parameters
    ----------
    run_dir : Path
        Where the run lives.
    sequences, samples_per_prompt, seed : int
        Parameters of ``make_synthetic_run.py``.
    logs : Path
        Folder for the generator's output.

    Returns
    -------
    dict
        The manifest's ``synthetic`` section, plus ``reused`` and, when generated
        now, ``generation_wall_s`` and ``generation_peak_rss_bytes``.
    """
    wanted = {"sequences": sequences, "samples_per_prompt": samples_per_prompt, "seed": seed}
    manifest_path = run_dir / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        synthetic = manifest.get("synthetic", {})
        parts_ok = all(
            len(list(folder.glob("part-*.parquet"))) == synthetic.get("parts")
            for folder in (
                run_dir / "samples",
                run_dir / "scores" / "p0",
                run_dir / "scores" / "p1",
            )
        )
        if (
            manifest.get("status") == "complete"
            and all(synthetic.get(k) == v for k, v in wanted.items())
            and parts_ok
        ):
            print(f"reusing the synthetic run in {run_dir}", file=sys.stderr)
            return {**synthetic, "reused": True}
    if run_dir.exists():
        # Only ever a folder this script named and its generator filled.
        shutil.rmtree(run_dir)
    print(f"generating {sequences} sequences into {run_dir} ...", file=sys.stderr, flush=True)
    command = [
        sys.executable,
        str(GENERATOR),
        str(run_dir),
        "--sequences",
        str(sequences),
        "--samples-per-prompt",
        str(samples_per_prompt),
        "--seed",
        str(seed),
    ]
    wall, _, rss, code = measure(command, logs / "generate.out", logs / "generate.err", None)
    if code != 0:
        raise SystemExit(f"generator failed ({code}):\n{tail(logs / 'generate.err', TAIL_LINES)}")
    synthetic = json.loads(manifest_path.read_text())["synthetic"]
    return {
        **synthetic,
        "reused": False,
        "generation_wall_s": wall,
        "generation_peak_rss_bytes": rss,
    }


def warm_page_cache(run_dir: Path) -> int:
    """Read every file of the run once; return the bytes read."""
    total = 0
    for path in sorted(run_dir.rglob("*.parquet")):
        with path.open("rb") as handle:
            while chunk := handle.read(16 * MIB):
                total += len(chunk)
    return total


def folder_sizes(run_dir: Path) -> dict[str, int]:
    """Bytes on disk of each table folder of the run."""
    folders = ["prompts", "samples", "scores/p0", "scores/p1"]
    return {
        name: sum(p.stat().st_size for p in (run_dir / name).glob("part-*.parquet"))
        for name in folders
    }


def polars_figures(run_dir: Path) -> dict[str, Any]:
    """The first candidate's figures and the run diagnostics from ``summary.json``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    candidate = summary["candidates"][summary["candidate"]]
    diagnostics = {
        k: summary[k]
        for k in (
            "num_prompts",
            "num_sequences",
            "avg_gen_length",
            "fraction_ended_by_eos",
            "fraction_ended_by_length",
            "max_abs_decode_vs_prefill_logprob_diff",
        )
    }
    return {**candidate, **diagnostics, "uncertainty_method": summary["uncertainty_method"]}


def relative_difference(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|), 0 when both are 0."""
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def compare(polars: dict[str, Any], numpy: dict[str, Any]) -> dict[str, Any]:
    """Differences between the two implementations' figures.

    Parameters
    ----------
    polars : dict
        Figures from ``summary.json``.
    numpy : dict
        Figures printed by the baseline.

    Returns
    -------
    dict
        ``required``: max relative difference over ``REQUIRED``; ``per_key``: the
        relative (or, for ``ABSOLUTE_ONLY``, absolute) difference of every numeric
        figure both report; ``missing``: numeric baseline figures absent from the
        summary.
    """
    per_key: dict[str, float] = {}
    missing = []
    for key, value in numpy.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        other = polars.get(key)
        if not isinstance(other, int | float):
            missing.append(key)
            continue
        if key in ABSOLUTE_ONLY:
            per_key[key] = abs(float(value) - float(other))
        else:
            per_key[key] = relative_difference(float(value), float(other))
    return {
        "required": max(per_key[k] for k in REQUIRED),
        "per_key": per_key,
        "missing": missing,
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summary_table(measurements: list[Measurement]) -> list[str]:
    """Markdown table: medians (and ranges) per implementation, then numpy / polars."""
    rows = [
        "| implementation | runs ok | wall time, median (min-max) | CPU time, median "
        "| peak RSS, median (min-max) |",
        "|---|---|---|---|---|",
    ]
    medians: dict[str, tuple[float, float, float]] = {}
    for name in (POLARS, NUMPY):
        ok = [m for m in measurements if m.name == name and m.returncode == 0]
        runs = [m for m in measurements if m.name == name]
        if not ok:
            rows.append(f"| {LABELS[name]} | 0/{len(runs)} | failed | | |")
            continue
        wall = [m.wall_s for m in ok]
        cpu = [m.cpu_s for m in ok]
        rss = [m.peak_rss_bytes / MIB for m in ok]
        medians[name] = (_median(wall), _median(cpu), _median(rss))
        rows.append(
            f"| {LABELS[name]} | {len(ok)}/{len(runs)} | {_median(wall):.1f} s "
            f"({min(wall):.1f}-{max(wall):.1f}) | {_median(cpu):.1f} s | "
            f"{_median(rss):,.0f} MiB ({min(rss):,.0f}-{max(rss):,.0f}) |"
        )
    if len(medians) == 2:
        wall, cpu, rss = (medians[NUMPY][i] / medians[POLARS][i] for i in range(3))
        rows.append(f"| **ratio numpy / polars** | | **{wall:.2f}** | {cpu:.2f} | **{rss:.2f}** |")
    return rows


def runs_table(measurements: list[Measurement]) -> list[str]:
    """Markdown table of every child process in the order they ran."""
    rows = [
        "| # | implementation | repeat | wall (s) | CPU (s) | peak RSS (MiB) | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for index, m in enumerate(measurements, 1):
        rows.append(
            f"| {index} | {m.name} | {m.repeat} | {m.wall_s:.1f} | {m.cpu_s:.1f} | "
            f"{m.peak_rss_bytes / MIB:,.0f} | {m.returncode} |"
        )
    return rows


def baseline_steps(measurements: list[Measurement]) -> list[str]:
    """Median seconds of each step of the NumPy baseline."""
    steps: dict[str, list[float]] = {}
    for m in measurements:
        if m.name == NUMPY and m.returncode == 0:
            for step, seconds in m.figures.get("timings", {}).items():
                steps.setdefault(step, []).append(seconds)
    rows = ["| NumPy baseline step | median (s) |", "|---|---|"]
    rows += [f"| {step} | {_median(values):.2f} |" for step, values in steps.items()]
    return rows


def command_line(args: argparse.Namespace) -> str:
    """The command as run, from the repository root, with the workdir as a placeholder."""
    return (
        ".venv/bin/python benchmarks/stats_scale.py "
        f"--sequences {args.sequences} --repeats {args.repeats} "
        f"--replicates {args.replicates} --samples-per-prompt {args.samples_per_prompt} "
        f"--seed {args.seed} --workdir WORKDIR" + (" --cleanup" if args.cleanup else "")
    )


def agreement_lines(comparisons: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """Markdown lines of the agreement check, and whether it passed."""
    if not comparisons:
        return ["No pair of successful runs to compare."], False
    worst_required = max(c["required"] for c in comparisons)
    passed = worst_required <= AGREEMENT_TOLERANCE
    # The *_bits figures are the *_nats ones divided by ln 2: not listed twice.
    keys = sorted({k for c in comparisons for k in c["per_key"] if not k.endswith("_bits")})
    worst = {k: max(c["per_key"].get(k, 0.0) for c in comparisons) for k in keys}
    others = {k: v for k, v in worst.items() if k not in REQUIRED}
    worst_other = max(others, key=lambda k: others[k]) if others else None
    lines = [
        f"Max relative difference over H0, H1, delta H and ESS (nats), all "
        f"{len(comparisons)} pairs of runs: **{worst_required:.2e}** "
        f"({'PASS' if passed else 'FAIL'}, tolerance {AGREEMENT_TOLERANCE:g}).",
        "",
        "| figure | max difference |",
        "|---|---|",
    ]
    lines += [
        f"| {k}{' (absolute)' if k in ABSOLUTE_ONLY else ''} | {worst[k]:.2e} |" for k in keys
    ]
    if worst_other is not None:
        lines += [
            "",
            f"Largest difference among the other figures: {worst_other} "
            f"({others[worst_other]:.2e}).",
        ]
    missing = sorted({k for c in comparisons for k in c["missing"]})
    if missing:
        lines += ["", f"Baseline figures with no counterpart in summary.json: {missing}."]
    return lines, passed


def write_results(
    path: Path,
    args: argparse.Namespace,
    data: dict[str, Any],
    measurements: list[Measurement],
    comparisons: list[dict[str, Any]],
    context: dict[str, Any],
    profile: str | None,
) -> None:
    """Write the Markdown report of the benchmark to ``path``.

    A section of an existing ``path`` that starts with ``## Notes`` is kept.
    """
    summary = summary_table(measurements)
    agreement, _ = agreement_lines(comparisons)
    sizes = data["sizes"]
    failures = [m for m in measurements if m.returncode != 0]
    lines = [
        "# `entropy-pipeline stats` at scale: Polars stage vs. a NumPy baseline",
        "",
        f"Measured {context['date']} by `benchmarks/stats_scale.py`.",
        "",
        "## Command",
        "",
        "From the repository root (WORKDIR: a scratch folder outside the repository, "
        "here one under the system temp directory; the synthetic run is created there "
        "and removed afterwards with `--cleanup`):",
        "",
        "```",
        command_line(args),
        "```",
        "",
        "## Result",
        "",
        *summary,
        "",
        f"Medians over {args.repeats} runs each, interleaved (polars, numpy, polars, "
        "...), each a fresh process; wall time around the child process, CPU time "
        "(user + system) and peak RSS from the kernel's rusage of that child "
        "(`os.wait4`). Ratios above 1 mean the NumPy baseline took more.",
        "",
        "### Agreement",
        "",
        *agreement,
        "",
        "### Every run",
        "",
        *runs_table(measurements),
        "",
        *baseline_steps(measurements),
        "",
    ]
    if profile:
        lines += [
            "### Steps of the Polars stats stage",
            "",
            "One more process, `benchmarks/profile_stats.py RUN_DIR --replicates "
            f"{args.replicates}`, runs `verify_run` and one `compute_summary` "
            "(uncertainty.estimand=population) with the pipeline's functions wrapped to "
            "time each phase and the calls in it (RSS sampled every 20 ms and at each "
            "wrapped call, so the peaks are lower bounds; the overall peak also from the "
            "kernel's VmHWM):",
            "",
            profile.strip(),
            "",
        ]
    if failures:
        lines += ["### Failures", ""]
        for m in failures:
            lines += [
                f"{m.name} repeat {m.repeat}: exit {m.returncode}",
                "",
                "```",
                m.stderr_tail,
                "```",
                "",
            ]
    lines += [
        "## Machine",
        "",
        f"- CPU: {context['cpu']}, {context['cores']} cores (os.cpu_count)",
        f"- memory: {context['memory_gib']:.1f} GiB, no GPU",
        f"- OS: {context['os']}",
        f"- load average (1 min) before / after: {context['load_before']:.2f} / "
        f"{context['load_after']:.2f}. The machine is shared with another developer "
        "running tests at the same time, so timings are noisy.",
        "",
        "## Data",
        "",
        f"- {data['sequences']:,} sequences = {data['prompts']:,} prompts x "
        f"{data['samples_per_prompt']} samples, {data['tokens']:,} completion tokens, "
        f"{data['parts']} part file(s) of about 1M rows per table (seed {data['seed']}).",
        "- sequence length L uniform on 1..16 (mean 8.5 tokens; L = 16 is a "
        "`length` finish, shorter ones `stop`); per-token log-probs of p0 are "
        "-(Exponential(mean 2) + 1e-4), p1's are p0's times exp(N(0, 0.05^2)) per token "
        "(moderate log-weights); decode-time log-probs equal p0's. See "
        "`benchmarks/make_synthetic_run.py`.",
        "- Parquet on disk (pyarrow defaults, snappy): "
        + ", ".join(f"{k} {v / MIB:,.0f} MiB" for k, v in sizes.items())
        + ". All files were read once before timing (page cache warm for both).",
    ]
    if not data.get("reused"):
        lines.append(
            f"- generating it took {data['generation_wall_s']:.0f} s, peak RSS "
            f"{data['generation_peak_rss_bytes'] / MIB:,.0f} MiB."
        )
    lines += [
        "- statistics options: the defaults of the synthetic config (unit sequence, "
        "include_eos true, weights none), uncertainty.estimand=population, "
        f"uncertainty.replicates={args.replicates}, bootstrap seed 0.",
        "",
        "## Library versions",
        "",
        f"- entropy-pipeline source: {context['revision_before']} at the start, "
        f"{context['revision_after']} at the end",
        *(f"- {k} {v}" for k, v in context["versions"].items()),
        f"- Polars thread pool: {context['polars_threads']} threads",
        "",
    ]
    write_report(path, lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on ``argv`` (default ``sys.argv[1:]``): 0 if all ran and agree, else 1."""
    parser = argument_parser(__doc__)
    parser.add_argument("--sequences", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "entropy-stats-bench",
        help="scratch folder for the synthetic run and logs (default: under the temp dir)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="kill a child after this many seconds"
    )
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--cleanup", action="store_true", help="delete the synthetic run when done")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the timed runs, time each phase of the stats stage once "
        "(profile_stats.py; default on)",
    )
    args = parser.parse_args(argv)

    import polars as pl

    run_dir = args.workdir / f"synthetic-n{args.sequences}-g{args.samples_per_prompt}-s{args.seed}"
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    context: dict[str, Any] = {
        **machine_context(LIBRARIES),
        "polars_threads": pl.thread_pool_size(),
        "load_before": os.getloadavg()[0],
        "revision_before": pipeline_revision(),
    }
    data = ensure_run(run_dir, args.sequences, args.samples_per_prompt, args.seed, logs)
    data["sizes"] = folder_sizes(run_dir)
    warm_page_cache(run_dir)

    commands = {
        POLARS: [
            entropy_pipeline_executable(),
            "stats",
            str(run_dir),
            "uncertainty.estimand=population",
            f"uncertainty.replicates={args.replicates}",
        ],
        NUMPY: [sys.executable, str(BASELINE), str(run_dir), "--replicates", str(args.replicates)],
    }
    measurements: list[Measurement] = []
    comparisons: list[dict[str, Any]] = []
    for repeat in range(1, args.repeats + 1):
        for name in (POLARS, NUMPY):
            stdout = logs / f"{name}-{repeat}.out"
            stderr = logs / f"{name}-{repeat}.err"
            (run_dir / "summary.json").unlink(missing_ok=True)
            wall, cpu, rss, code = measure(commands[name], stdout, stderr, args.timeout)
            m = Measurement(name, repeat, wall, cpu, rss, code)
            if code == 0:
                m.figures = (
                    polars_figures(run_dir) if name == POLARS else json.loads(stdout.read_text())
                )
            else:
                m.stderr_tail = tail(stderr, TAIL_LINES)
            measurements.append(m)
            print(
                f"{name:6s} repeat {repeat}: {wall:7.1f} s wall, {cpu:7.1f} s CPU, "
                f"peak RSS {rss / MIB:8,.0f} MiB, exit {code}",
                file=sys.stderr,
                flush=True,
            )
            if code != 0:
                print(m.stderr_tail, file=sys.stderr)
        pair = [m for m in measurements[-2:] if m.returncode == 0]
        if len(pair) == 2:
            comparisons.append(compare(pair[0].figures, pair[1].figures))
    context["load_after"] = os.getloadavg()[0]
    context["revision_after"] = pipeline_revision()
    profile = None
    if args.profile:
        command = [
            sys.executable,
            str(PROFILER),
            str(run_dir),
            "--replicates",
            str(args.replicates),
        ]
        out, err = logs / "profile.out", logs / "profile.err"
        wall, _, rss, code = measure(command, out, err, args.timeout)
        print(f"profile: {wall:.1f} s, peak RSS {rss / MIB:,.0f} MiB, exit {code}", file=sys.stderr)
        profile = (
            out.read_text() if code == 0 else f"profile failed:\n```\n{tail(err, TAIL_LINES)}\n```"
        )
        if code == 0:
            print(profile)

    print("\n".join(summary_table(measurements)))
    agreement, passed = agreement_lines(comparisons)
    print(agreement[0])
    write_results(args.results, args, data, measurements, comparisons, context, profile)
    print(f"results written to {args.results}", file=sys.stderr)
    if args.cleanup:
        shutil.rmtree(run_dir)
        print(f"removed {run_dir}", file=sys.stderr)
    ok = passed and all(m.returncode == 0 for m in measurements)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
