"""Driver memory and time of planning + the prompts stage, and of statistics, vs. prompt count.

Usage::

    python benchmarks/plan_scale.py [--prompts 10000 1000000] [--workdir DIR]
        [--config configs/default.yaml] [--prompts-per-shard 256]
        [--samples-per-prompt 8] [--timeout 3600] [--results benchmarks/PLAN_SCALE.md]
        [--cleanup]

No engine runs. For each size N:

1. Writes ``WORKDIR/prompts-N.jsonl``: the ``text`` prompts of ``data/prompts.jsonl``
   cycled to N with unique ids (``run_scale.write_prompts``; 4 to 16 tokens each).
2. Plan + prompts, in a fresh process (this script's ``child-plan`` command): the
   driver's own functions of ``pipeline.run``, as ``run_pipeline`` calls them before
   any engine starts: ``load_config`` with ``prompts.path`` and
   ``shards.prompts_per_shard`` overridden, ``_plan`` (tokenizers, model identities,
   the streamed SHA-256 of the prompt file), ``_reconcile``, a ``_Manifest`` and
   ``_prompt_shards`` (stream, validate and tokenize the prompts and write
   ``WORKDIR/plan-N/prompts/part-K``, one shard in memory at a time). The child reports
   its RSS after the imports, its peak after planning and at the end
   (``/proc/self/status``), the seconds of each step, and the largest RSS it sampled
   (every 0.2 s) while writing each quarter of the prompt shards: a working set that
   does not depend on the prompts read so far gives four equal numbers.
3. Statistics on synthetic artifacts of the same size: ``make_synthetic_run.py``
   writes ``WORKDIR/synthetic-N`` with N prompts x G samples in parts of
   ``prompts-per-shard`` x G sequences (the run's shard layout; a complete one made
   with the same sizes is reused), then
   ``entropy-pipeline stats WORKDIR/synthetic-N`` runs in a fresh process.

Each child is measured by ``os.wait4``: wall time around it, CPU time and its exact
peak RSS. The growth of the peak between two sizes, divided by the extra prompts, is
the memory each prompt costs the driver; the issue's goal for plan + prompts is at
most a few bytes. Writes the tables, with the machine and versions, to ``--results``.
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
from run_scale import shard_quarters, write_prompts

HERE = Path(__file__).resolve().parent
GENERATOR = HERE / "make_synthetic_run.py"
DEFAULT_CONFIG = Path("configs") / "default.yaml"
PLAN, STATS = "plan + prompts", "stats"
LIBRARIES = ("entropy-pipeline", "transformers", "tokenizers", "polars", "pyarrow", "numpy")
TAIL_LINES = 15
RSS_INTERVAL = 0.2  # seconds between the plan child's RSS samples


def _proc_status_bytes(field_name: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak RSS) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def child_plan(config: Path, prompts: Path, run_dir: Path, prompts_per_shard: int) -> int:
    """Plan a run and write its prompts stage, as the driver does; print a JSON report.

    Parameters
    ----------
    config : Path
        The run's YAML config.
    prompts : Path
        The prompt file (overrides ``prompts.path``).
    run_dir : Path
        A fresh run directory.
    prompts_per_shard : int
        ``shards.prompts_per_shard``.

    Returns
    -------
    int
        0. Prints one JSON object: ``rss_after_imports``, ``peak_after_plan``,
        ``peak_at_end``, ``rss_at_end`` (bytes), ``plan_s``, ``prompts_s`` (seconds),
        ``prompts``, ``shards``, and ``rss_by_quarter``: the largest sampled RSS while
        the first, second, third and last quarter of the prompt shards were written.
    """
    from pipeline.artifacts import prompts_dir
    from pipeline.config import load_config
    from pipeline.run import _Manifest, _plan, _prompt_shards, _reconcile, _require_writable

    rss_after_imports = _proc_status_bytes("VmRSS")
    started = time.perf_counter()
    plan = _plan(
        load_config(
            config,
            [f"prompts.path={prompts}", f"shards.prompts_per_shard={prompts_per_shard}"],
        )
    )
    previous = _reconcile(run_dir, plan, force=False)
    _require_writable(run_dir)
    planned = time.perf_counter()
    peak_after_plan = _proc_status_bytes("VmHWM")
    # The manifest keys the prompts stage reads and writes; run_pipeline adds provenance.
    manifest = _Manifest(
        run_dir, {"inputs": plan.stage_inputs, "stages": previous.get("stages", {})}
    )
    folder, written = prompts_dir(run_dir), []  # (prompt parts written, RSS bytes)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(RSS_INTERVAL):
            parts = sum(1 for _ in folder.glob("part-*.parquet")) if folder.is_dir() else 0
            written.append((parts, _proc_status_bytes("VmRSS")))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        record = _prompt_shards(plan, run_dir, manifest)
    finally:
        stop.set()
        watcher.join()
    shards = len(record["shard_sizes"])
    # The timeline as run_scale's samples: seconds, phase, shards, shards done, RSS.
    quarters = shard_quarters([(0.0, "prompts", shards, n, rss) for n, rss in written])
    report = {
        "rss_after_imports": rss_after_imports,
        "peak_after_plan": peak_after_plan,
        "peak_at_end": _proc_status_bytes("VmHWM"),
        "rss_at_end": _proc_status_bytes("VmRSS"),
        "plan_s": planned - started,
        "prompts_s": time.perf_counter() - planned,
        "prompts": record["num_prompts"],
        "shards": shards,
        "rss_by_quarter": quarters.get("prompts", []),
    }
    print(json.dumps(report))
    return 0


@dataclass
class Measurement:
    """One child: what it did, for how many prompts, its cost and its own report."""

    step: str
    prompts: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    shards: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""


def _run_child(
    step: str, count: int, shards: int, command: list[str], logs: Path, timeout: float
) -> Measurement:
    """Run and measure one child; the plan child's last line of output is its report."""
    name = f"{step.split()[0]}-{count}"
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    print(f"{step}: {count:,} prompts (load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr)
    wall, cpu, rss, code = measure(command, out, err, timeout, cwd=ROOT)
    m = Measurement(step, count, wall, cpu, rss, code, shards)
    if code != 0:
        m.stderr_tail = tail(err, TAIL_LINES)
        print(m.stderr_tail, file=sys.stderr)
    elif step == PLAN:
        m.report = json.loads(out.read_text().splitlines()[-1])
    print(
        f"{step}: {count:,} prompts: {wall:,.1f} s wall, peak RSS {rss / MIB:,.1f} MiB, "
        f"exit {code}",
        file=sys.stderr,
        flush=True,
    )
    return m


def _mib(value: float) -> str:
    return f"{value / MIB:,.1f}"


def results_table(measurements: list[Measurement]) -> list[str]:
    """Markdown table: one row per child."""
    rows = [
        "| step | prompts | shards | wall (s) | CPU (s) | peak RSS (MiB) | RSS after imports "
        "(MiB) | peak after planning (MiB) | plan (s) | prompts stage (s) | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in measurements:
        r = m.report
        extra = (
            f"{_mib(r['rss_after_imports'])} | {_mib(r['peak_after_plan'])} | "
            f"{r['plan_s']:,.1f} | {r['prompts_s']:,.1f}"
            if r
            else "- | - | - | -"
        )
        rows.append(
            f"| {m.step} | {m.prompts:,} | {m.shards:,} | {m.wall_s:,.1f} | {m.cpu_s:,.1f} | "
            f"**{_mib(m.peak_rss_bytes)}** | {extra} | {m.returncode} |"
        )
    return rows


def quarters_table(measurements: list[Measurement]) -> list[str]:
    """Markdown table: the plan child's RSS by quarter of the prompt shards written."""
    rows = [
        "| prompts | shards | RSS by quarter of the shards written: 1st / 2nd / 3rd / 4th "
        "(MiB) | 4th - 1st (MiB) |",
        "|---|---|---|---|",
    ]
    for m in measurements:
        peaks = m.report.get("rss_by_quarter")
        if peaks:
            rows.append(
                f"| {m.prompts:,} | {m.shards:,} | "
                + " / ".join(_mib(p) if p else "-" for p in peaks)
                + (f" | {(peaks[3] - peaks[0]) / MIB:+,.1f} |" if all(peaks) else " | - |")
            )
    return rows


def growth_lines(measurements: list[Measurement]) -> list[str]:
    """Peak RSS growth per extra prompt between consecutive sizes, for each step.

    bytes/prompt = (peak(N2) - peak(N1)) / (N2 - N1).
    """
    lines = []
    for step in (PLAN, STATS):
        ok = [m for m in measurements if m.step == step and m.returncode == 0]
        for small, large in itertools.pairwise(ok):
            grow = large.peak_rss_bytes - small.peak_rss_bytes
            lines.append(
                f"- {step}: {small.prompts:,} -> {large.prompts:,} prompts: peak RSS "
                f"{_mib(small.peak_rss_bytes)} -> {_mib(large.peak_rss_bytes)} MiB "
                f"({grow / MIB:+,.1f} MiB), **{grow / (large.prompts - small.prompts):,.1f} "
                f"bytes per prompt**; wall {small.wall_s:,.1f} -> {large.wall_s:,.1f} s, "
                f"CPU {small.cpu_s:,.1f} -> {large.cpu_s:,.1f} s."
            )
    return lines


def command_line(args: argparse.Namespace) -> str:
    """The command as run, from the repository root, with the workdir as a placeholder."""
    return (
        ".venv/bin/python benchmarks/plan_scale.py --prompts "
        + " ".join(str(n) for n in args.prompts)
        + f" --prompts-per-shard {args.prompts_per_shard}"
        + f" --samples-per-prompt {args.samples_per_prompt} --workdir WORKDIR"
        + (" --cleanup" if args.cleanup else "")
    )


def write_results(
    path: Path, args: argparse.Namespace, measurements: list[Measurement], context: dict
) -> None:
    """Write the Markdown report to ``path``, keeping a ``## Notes`` section of an old one."""
    failures = [m for m in measurements if m.returncode != 0]
    lines = [
        "# Planning, the prompts stage and statistics vs. prompt count (no engines)",
        "",
        f"Measured {context['date']} by `benchmarks/plan_scale.py`.",
        "",
        "## Command",
        "",
        "From the repository root (WORKDIR: a scratch folder outside the repository):",
        "",
        "```",
        command_line(args),
        "```",
        "",
        f"Prompts: the {context['texts']} `text` prompts of `data/prompts.jsonl` cycled "
        f"to N with unique ids; config `{args.config}` (the two tiny models' tokenizer); "
        f"shards of {args.prompts_per_shard} prompts. `{PLAN}`: `load_config`, `_plan`, "
        "`_reconcile`, `_Manifest` and `_prompt_shards` of `pipeline.run` in a fresh "
        f"process (`benchmarks/plan_scale.py child-plan ...`). `{STATS}`: "
        "`entropy-pipeline stats` in a fresh process on a synthetic run of N prompts x "
        f"{args.samples_per_prompt} samples (`make_synthetic_run.py --part-rows "
        f"{args.prompts_per_shard * args.samples_per_prompt}`: one part per shard).",
        "",
        "## Result",
        "",
        *results_table(measurements),
        "",
        "Wall time around the child; CPU time (user + system) and peak RSS from the "
        "kernel's rusage of that child (`os.wait4`), exact. The other columns come from "
        "the plan child's `/proc/self/status`: RSS once `pipeline.run` is imported, and "
        "the peak (VmHWM) once planning is done (before the prompts stage starts).",
        "",
        "### Memory per prompt",
        "",
        *growth_lines(measurements),
        "",
        "### The prompts stage as it reads",
        "",
        *quarters_table(measurements),
        "",
        f"Largest RSS of the plan child sampled every {RSS_INTERVAL:g} s while it wrote "
        "the first, second, third and last quarter of its prompt shards (the shard in "
        "work: the count of part files written so far; lower bounds of the exact peak; "
        "- where no sample fell in a quarter).",
        "",
    ]
    if failures:
        lines += ["### Failures", ""]
        for m in failures:
            lines += [f"{m.step}, {m.prompts} prompts: exit {m.returncode}", "", "```"]
            lines += [m.stderr_tail, "```", ""]
    lines += [
        *machine_and_versions(
            context,
            "The machine is shared with other developers running tests"
            " at the same time, so timings are noisy (peak memory is not).",
        ),
    ]
    write_report(path, lines)


def ensure_synthetic(
    run_dir: Path, prompts: int, samples_per_prompt: int, part_rows: int, logs: Path
) -> None:
    """Write a synthetic run of ``prompts`` x ``samples_per_prompt`` sequences.

    A complete one with the same sizes (its manifest's ``synthetic`` section, and as
    many parts in every folder) is kept.
    """
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        synthetic = json.loads(manifest.read_text()).get("synthetic", {})
        parts = -(-prompts * samples_per_prompt // part_rows)
        folders = [run_dir / "prompts", run_dir / "samples", *(run_dir / "scores").iterdir()]
        if (
            synthetic.get("prompts") == prompts
            and synthetic.get("samples_per_prompt") == samples_per_prompt
            and synthetic.get("parts") == parts
            and all(len(list(f.glob("part-*.parquet"))) == parts for f in folders)
        ):
            print(f"reusing the synthetic run {run_dir}", file=sys.stderr)
            return
    if run_dir.exists():
        # Only ever a folder this script named and its generator filled.
        shutil.rmtree(run_dir)
    print(f"generating synthetic artifacts of {prompts:,} prompts ...", file=sys.stderr)
    command = [
        sys.executable,
        str(GENERATOR),
        str(run_dir),
        "--sequences",
        str(prompts * samples_per_prompt),
        "--samples-per-prompt",
        str(samples_per_prompt),
        "--part-rows",
        str(part_rows),
    ]
    name = f"generate-{prompts}"
    _, _, _, code = measure(command, logs / f"{name}.out", logs / f"{name}.err", None)
    if code != 0:
        raise SystemExit(f"generator failed ({code}):\n{tail(logs / f'{name}.err', TAIL_LINES)}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``child-plan``, one plan child); 0 if all succeeded."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child-plan"]:
        config, prompts, run_dir, per_shard = argv[1:]
        return child_plan(Path(config), Path(prompts), Path(run_dir), int(per_shard))
    parser = argument_parser(__doc__)
    parser.add_argument("--prompts", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "entropy-plan-bench",
        help="scratch folder for prompt files, runs and logs (default: under the temp dir)",
    )
    parser.add_argument("--prompts-per-shard", type=int, default=256)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="relative to the repository root"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="kill a child after (s)")
    parser.add_argument("--results", type=Path, default=HERE / "PLAN_SCALE.md")
    parser.add_argument(
        "--cleanup", action="store_true", help="delete each size's files after measuring it"
    )
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    context: dict[str, Any] = {
        **machine_context(LIBRARIES),
        "load_before": os.getloadavg(),
        "revision_before": pipeline_revision(),
    }
    measurements: list[Measurement] = []
    for count in args.prompts:
        prompts, run_dir = workdir / f"prompts-{count}.jsonl", workdir / f"plan-{count}"
        synthetic = workdir / f"synthetic-{count}"
        context["texts"] = write_prompts(prompts, count)
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh prompts stage, never a reused one
        plan_command = [sys.executable, str(Path(__file__).resolve()), "child-plan"]
        plan_command += [str(args.config), str(prompts), str(run_dir)]
        plan_command.append(str(args.prompts_per_shard))
        shards = -(-count // args.prompts_per_shard)
        measurements.append(_run_child(PLAN, count, shards, plan_command, logs, args.timeout))
        ensure_synthetic(
            synthetic,
            count,
            args.samples_per_prompt,
            args.prompts_per_shard * args.samples_per_prompt,
            logs,
        )
        stats_command = [entropy_pipeline_executable(), "stats", str(synthetic)]
        measurements.append(_run_child(STATS, count, shards, stats_command, logs, args.timeout))
        if args.cleanup:
            for path in (run_dir, synthetic):
                shutil.rmtree(path, ignore_errors=True)
            prompts.unlink()
    context["load_after"] = os.getloadavg()
    context["revision_after"] = pipeline_revision()
    print("\n".join([*results_table(measurements), "", *growth_lines(measurements)]))
    write_results(args.results, args, measurements, context)
    print(f"written to {args.results}", file=sys.stderr)
    return 0 if all(m.returncode == 0 for m in measurements) else 1


if __name__ == "__main__":
    sys.exit(main())
