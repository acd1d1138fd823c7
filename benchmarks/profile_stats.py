"""Time and memory of each phase of the batched stats stage, in one process.

Usage::

    python benchmarks/profile_stats.py RUN_DIR [--replicates 1000]
        [--estimand population|prompt_set]

What it measures: ``entropy-pipeline stats`` as it runs now, that is ``verify_run``
(the check of every part against the manifest that ``run_stats`` does first) and then
one call of the real ``pipeline.stats.summary.compute_summary(run_dir, config)``, with
the run's statistics options and ``uncertainty.replicates`` = ``--replicates`` and
``uncertainty.estimand`` = ``--estimand`` (default population: the cluster bootstrap,
as ``stats_scale.py`` runs the stage). No step is re-implemented here: in this process
only, the functions that ``compute_summary`` and ``candidate_summary`` call through
their module's names (and a few class methods) are wrapped to take the time and the
resident set size (RSS) at their entry and exit. That splits the stage into its phases,
in order:

* ``shard_parts``: the file lists, the schema check of every part, the row counts;
* per candidate, pass 1: the log-weights of each batch of shards
  (``PairedShards.log_weights``), ``LogWeightScan.add``, and ``fit_stabiliser``;
* pass 2: each batch's paired frame (``PairedShards.frame``) and the work on it
  (``prepare``, ``prompt_sums``, the bootstrap's or the scatter's sums,
  ``WeightTotals.add``, ``per_prompt_table``, the write of its rows, ...);
* the exact quantiles of the per-prompt ESS (re-reading the spill) and of the
  log-weights (re-reading every batch), then the intervals, diagnostics and warnings;
* closing per_prompt.parquet, and ``generation_diagnostics`` (the samples read again).

Each phase is listed with its seconds, the RSS after it and the peak RSS while it ran,
and under it (rows starting with ``↳``) the wrapped calls it made, added up over the
batches, and "the rest", the phase's time outside them. Why: the stage reads the run
several times in batches of whole shards so that its memory does not grow with the
run; the table shows where the time goes, and which phase's memory, if any, grows.

A thread samples the RSS every 20 ms (and at every wrapped entry and exit), so the
peaks are lower bounds; the overall peak is also taken from the kernel's high-water
mark (VmHWM, reset before each of verify_run and compute_summary where Linux allows).
Nothing is left in the run directory: per_prompt.parquet is written into a temporary
folder beside it (on the same disk) and deleted; summary.json, summary.parquet and the
report figure, which ``run_stats`` writes after ``compute_summary``, are not made.

Output: a Markdown table and a few summary lines on stdout (``stats_scale.py`` embeds
them in its results); one JSON object per row on stderr as each phase ends.
"""

from __future__ import annotations

import bisect
import functools
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import psutil
from _common import MIB, argument_parser

from pipeline.artifacts import read_manifest
from pipeline.config import validate_config
from pipeline.stats import summary
from pipeline.stats.summary import PairedShards, compute_summary
from pipeline.stats.uncertainty import ClusterBootstrap
from pipeline.stats.weights import (
    LOG_WEIGHT_QUANTILES,
    PROMPT_ESS_QUANTILES,
    LogWeightScan,
    WeightTotals,
)
from pipeline.verify import verify_run

Span = tuple[float, float]
PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class RssSeries:
    """The RSS of this process over time: sampled by a thread, and on demand (``now``)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self._times: list[float] = []
        self._rss: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.now()

    def now(self) -> float:
        """Sample the RSS now; return the sample's time (``time.perf_counter``)."""
        rss = self.process.memory_info().rss
        with self._lock:  # the time taken under the lock: the series stays in order
            moment = time.perf_counter()
            self._times.append(moment)
            self._rss.append(rss)
        return moment

    def peak(self, spans: list[Span]) -> int:
        """The largest sample taken within any of ``spans`` (their ends included)."""
        with self._lock:
            times, rss = list(self._times), list(self._rss)
        found = [
            max(rss[bisect.bisect_left(times, a) : bisect.bisect_right(times, b)], default=0)
            for a, b in spans
        ]
        return max(found, default=0)

    def at(self, moment: float) -> int:
        """The last sample taken at or before ``moment``."""
        with self._lock:
            return self._rss[max(bisect.bisect_right(self._times, moment) - 1, 0)]

    def overall_peak(self) -> int:
        """The largest sample so far."""
        with self._lock:
            return max(self._rss)

    def stop(self) -> None:
        """End sampling."""
        self._stop.set()
        self._thread.join()


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM); False where not allowed."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def high_water_mark() -> int | None:
    """VmHWM of this process in bytes, or None where /proc does not say."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def gaps(whole: Span, inside: list[Span]) -> list[Span]:
    """The parts of ``whole`` outside the (disjoint) spans ``inside``."""
    found, start = [], whole[0]
    for a, b in sorted(inside):
        found.append((start, a))
        start = b
    found.append((start, whole[1]))
    return [(a, b) for a, b in found if b > a]


@dataclass
class Phase:
    """A stretch of the stage, and the wrapped calls made in it (label -> spans)."""

    name: str
    start: float
    calls: dict[str, list[Span]] = field(default_factory=dict)
    # Opened only to be named by what comes next (see ``Profiler.open``).
    provisional: bool = False


class Profiler:
    """Rows of (step, calls, seconds, RSS after, peak RSS), built as the stage runs."""

    def __init__(self, series: RssSeries) -> None:
        self.series = series
        self.rows: list[dict[str, Any]] = []
        self.phase: Phase | None = None
        self._depth = 0  # wrapped calls in progress: only the outermost is recorded

    def row(
        self, step: str, spans: list[Span], calls: int | None = None, sub: bool = False
    ) -> None:
        """Add a row measured over ``spans`` (seconds summed, peak over all of them)."""
        seconds = sum(b - a for a, b in spans)
        after = self.series.at(spans[-1][1]) if spans else 0
        row = {
            "step": f"↳ {step}" if sub else step,
            "calls": calls,
            "seconds": round(seconds, 3),
            "rss_after_mib": round(after / MIB),
            "peak_mib": round(max(self.series.peak(spans), after) / MIB),
        }
        self.rows.append(row)
        print(json.dumps(row, ensure_ascii=False), file=sys.stderr, flush=True)

    def open(self, name: str, provisional: bool = False) -> None:
        """Start a phase; a provisional phase still open is taken into it."""
        moment = self.series.now()
        if self.phase is not None and self.phase.provisional:
            # Bookkeeping between two phases (microseconds): counted in the next one.
            self.phase.name, self.phase.provisional = name, provisional
            return
        self.close()
        self.phase = Phase(name, moment, provisional=provisional)

    def close(self, name: str | None = None) -> float:
        """End the open phase (renamed to ``name`` if given): its row and its calls' rows."""
        moment = self.series.now()
        phase, self.phase = self.phase, None
        if phase is None:
            return moment
        whole = (phase.start, moment)
        self.row(name or phase.name, [whole])
        inside = [span for spans in phase.calls.values() for span in spans]
        if inside:
            for label, spans in phase.calls.items():
                self.row(label, spans, len(spans), sub=True)
            self.row("the rest of the phase", gaps(whole, inside), sub=True)
        return moment

    def call(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, recording each outermost call's span in the open phase."""

        @functools.wraps(function)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self._depth or self.phase is None:
                return function(*args, **kwargs)
            self._depth += 1
            start = self.series.now()
            try:
                return function(*args, **kwargs)
            finally:
                stop = self.series.now()
                self._depth -= 1
                if self.phase is not None:
                    self.phase.calls.setdefault(label, []).append((start, stop))

        return wrapped


@contextmanager
def patched(target: Any, name: str, replacement: Any) -> Iterator[None]:
    """Set ``target.name`` to ``replacement`` for the block."""
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def instrument(profiler: Profiler, per_prompt_dir: Path) -> list[Any]:
    """The patches that make ``compute_summary`` report its phases to ``profiler``.

    Phases are opened and closed by the wrappers of the calls that mark their ends
    (``candidate_summary``, ``fit_stabiliser``, ``exact_quantiles``, the per-prompt
    writer's close, ``generation_diagnostics``); the other wrappers add their calls to
    the open phase. per_prompt.parquet goes to ``per_prompt_dir``.
    """
    original = {
        name: getattr(summary, name)
        for name in (
            "shard_parts",
            "candidate_summary",
            "fit_stabiliser",
            "exact_quantiles",
            "generation_diagnostics",
            "table_writer",
        )
    }
    candidate = {"name": "?"}
    quantiles_of = {
        tuple(PROMPT_ESS_QUANTILES): "per-prompt ESS (re-reading the spill)",
        tuple(LOG_WEIGHT_QUANTILES): "log-weights (re-reading every batch)",
    }

    def shard_parts(*args: Any, **kwargs: Any) -> Any:
        if profiler.phase is not None:  # within generation_diagnostics
            return profiler.call("shard_parts", original["shard_parts"])(*args, **kwargs)
        profiler.open("shard_parts (file lists, schema check of every part, row counts)")
        result = original["shard_parts"](*args, **kwargs)
        profiler.close()
        return result

    def candidate_summary(shards: PairedShards, *args: Any, **kwargs: Any) -> Any:
        candidate["name"] = name = shards.candidate
        start = profiler.series.now()
        profiler.open(f"{name}: pass 1, log-weights of {len(shards)} batch(es), fit")
        result = original["candidate_summary"](shards, *args, **kwargs)
        stop = profiler.close()
        profiler.row(f"{name}: candidate_summary in all", [(start, stop)])
        return result

    def fit_stabiliser(*args: Any, **kwargs: Any) -> Any:
        imported = "arviz_stats" in sys.modules
        result = profiler.call("fit_stabiliser", original["fit_stabiliser"])(*args, **kwargs)
        if not imported and "arviz_stats" in sys.modules and profiler.phase is not None:
            # Its first call imports arviz-stats (and SciPy): most of its time at this size.
            spans = profiler.phase.calls.pop("fit_stabiliser")
            profiler.phase.calls["fit_stabiliser (imports arviz-stats)"] = spans
        profiler.open(f"{candidate['name']}: pass 2, paired frames, sums, per-prompt rows")
        return result

    def exact_quantiles(chunks: Callable[[], Any], probs: Any, **kwargs: Any) -> Any:
        what = quantiles_of.get(tuple(probs), "values")
        passes = 0

        def counted() -> Any:
            nonlocal passes
            passes += 1
            return chunks()

        name = f"{candidate['name']}: exact quantiles of the {what}"
        profiler.open(name)
        result = original["exact_quantiles"](counted, probs, **kwargs)
        profiler.close(f"{name}, {passes} pass(es)")
        # Named now, ended by the next phase or by the candidate's end; the few
        # statements between the two quantiles (closing the spill) go into the second.
        profiler.open(f"{candidate['name']}: intervals, diagnostics, warnings", provisional=True)
        return result

    def generation_diagnostics(*args: Any, **kwargs: Any) -> Any:
        profiler.open("generation_diagnostics (counts, decode vs prefill: samples re-read)")
        result = original["generation_diagnostics"](*args, **kwargs)
        profiler.close()
        return result

    @contextmanager
    def table_writer(path: Path, *args: Any, **kwargs: Any) -> Iterator[Callable[..., None]]:
        with original["table_writer"](per_prompt_dir / path.name, *args, **kwargs) as write:
            yield profiler.call("writing the per-prompt rows", write)
            profiler.open("per_prompt.parquet: last row group, rename")
        profiler.close()

    def calls(target: Any, name: str, label: str | None = None) -> Any:
        return patched(target, name, profiler.call(label or name, getattr(target, name)))

    return [
        patched(summary, "shard_parts", shard_parts),
        patched(summary, "candidate_summary", candidate_summary),
        patched(summary, "fit_stabiliser", fit_stabiliser),
        patched(summary, "exact_quantiles", exact_quantiles),
        patched(summary, "generation_diagnostics", generation_diagnostics),
        patched(summary, "table_writer", table_writer),
        calls(PairedShards, "log_weights", "PairedShards.log_weights (read)"),
        calls(PairedShards, "frame", "PairedShards.frame (read)"),
        calls(PairedShards, "raw_log_w1", "PairedShards.raw_log_w1 (read)"),
        calls(LogWeightScan, "add", "LogWeightScan.add"),
        calls(summary, "prepare"),
        calls(summary, "prompt_sums"),
        calls(summary, "stratum_scatter"),
        calls(ClusterBootstrap, "add", "ClusterBootstrap.add"),
        calls(WeightTotals, "add", "WeightTotals.add"),
        calls(summary, "per_prompt_table"),
        calls(summary, "largest_changes"),
    ]


def profile(run_dir: Path, replicates: int, estimand: str) -> dict[str, Any]:
    """Run ``verify_run`` and ``compute_summary`` on ``run_dir`` and measure their phases.

    Parameters
    ----------
    run_dir : Path
        A complete run directory.
    replicates : int
        ``uncertainty.replicates``.
    estimand : str
        ``uncertainty.estimand``.

    Returns
    -------
    dict
        ``rows``: one entry per row (``step``, ``calls``, ``seconds``,
        ``rss_after_mib``, ``peak_mib``), and a few figures of the run and the process.
    """
    manifest = read_manifest(run_dir)
    tree = manifest["config"]
    tree.setdefault("uncertainty", {}).update(replicates=replicates, estimand=estimand)
    config = validate_config(tree, "of the profiled run")
    series = RssSeries()
    profiler = Profiler(series)
    facts: dict[str, Any] = {"rss_start_mib": round(series.at(series.now()) / MIB)}

    exact_peak = reset_high_water_mark()
    start = series.now()
    verify_run(run_dir, manifest)
    profiler.row("verify_run (run_stats: every part against the manifest)", [(start, series.now())])
    facts["verify_hwm"] = high_water_mark() if exact_peak else None

    exact_peak = reset_high_water_mark()
    with ExitStack() as stack:
        # Beside the run, on its disk (a temporary folder may be memory, tmpfs).
        out = tempfile.TemporaryDirectory(prefix=f".{run_dir.name}-profile-", dir=run_dir.parent)
        for patch in instrument(profiler, Path(stack.enter_context(out))):
            stack.enter_context(patch)
        start = series.now()
        result = compute_summary(run_dir, config)
        stop = series.now()
    profiler.row("compute_summary in all", [(start, stop)])
    facts.update(
        rows=profiler.rows,
        compute_hwm=high_water_mark() if exact_peak else None,
        sampled_peak_mib=round(series.peak([(start, stop)]) / MIB),
        num_sequences=result["num_sequences"],
        num_prompts=result["num_prompts"],
        candidates=list(config.candidates),
        uncertainty=config.uncertainty.model_dump(mode="json"),
        weights_mode=config.weights.mode,
        unit=config.entropy.unit,
        polars_threads=pl.thread_pool_size(),
    )
    series.stop()
    return facts


def main(argv: list[str] | None = None) -> int:
    """Command line: one JSON line per row on stderr, a table on stdout; the exit status."""
    parser = argument_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument(
        "--estimand",
        choices=["population", "prompt_set"],
        default="population",
        help="uncertainty.estimand (default population, as stats_scale.py runs the stage)",
    )
    args = parser.parse_args(argv)
    facts = profile(args.run_dir, args.replicates, args.estimand)
    u = facts["uncertainty"]
    print(
        f"{facts['num_sequences']:,} sequences, {facts['num_prompts']:,} prompts; "
        f"candidates {', '.join(facts['candidates'])}; unit {facts['unit']}, weights "
        f"{facts['weights_mode']}, estimand {u['estimand']}, {u['replicates']} replicates; "
        f"{facts['polars_threads']} Polars threads.",
    )
    print()
    print("| step | calls | seconds | RSS after (MiB) | peak RSS during (MiB) |")
    print("|---|---|---|---|---|")
    for s in facts["rows"]:
        calls = "" if s["calls"] is None else f"{s['calls']:,}"
        print(
            f"| {s['step']} | {calls} | {s['seconds']:.2f} | {s['rss_after_mib']:,} "
            f"| {s['peak_mib']:,} |"
        )
    print()
    hwm = facts["compute_hwm"]
    exact = f"{hwm / MIB:,.0f} MiB" if hwm is not None else "not available"
    verify = facts["verify_hwm"]
    print(
        f"RSS before verify_run {facts['rss_start_mib']:,} MiB (interpreter and imports). "
        f"Peak RSS during compute_summary: {facts['sampled_peak_mib']:,} MiB sampled, "
        f"{exact} by the kernel (VmHWM reset before it)"
        + (f"; during verify_run {verify / MIB:,.0f} MiB." if verify is not None else ".")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
