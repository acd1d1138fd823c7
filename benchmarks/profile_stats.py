"""Time and memory of each step of the Polars stats stage, in one process.

Usage::

    python benchmarks/profile_stats.py RUN_DIR [--replicates 1000]

Runs the steps of ``pipeline.stats.summary.compute_summary`` one by one, in its order
and with the run's statistics options, for the first candidate, calling the
pipeline's own functions: the paired frame, the weights, grouping, ``prompt_sums``,
the point estimates, both estimands' errors (prompt-set influence functions and the
population bootstrap), weight diagnostics, the per-prompt table, and the generation
diagnostics. A thread samples the process's RSS every 20 ms; each step reports its
seconds, the RSS after it and the peak RSS while it ran. Nothing is written into the run directory.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import psutil
from _common import MIB, argument_parser

from pipeline.artifacts import read_manifest
from pipeline.config import validate_config
from pipeline.stats.estimators import complete_paired, point_estimates, prepare, prompt_sums
from pipeline.stats.summary import generation_diagnostics, paired_frame, per_prompt_table
from pipeline.stats.uncertainty import cluster_bootstrap, prompt_set_errors
from pipeline.stats.weights import stabilise_log_weights, weight_diagnostics


class PeakSampler:
    """Background sampler of this process's resident set size."""

    def __init__(self, interval: float = 0.02) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def reset(self) -> None:
        """Start a new peak from the current RSS."""
        self.peak = self.process.memory_info().rss

    def stop(self) -> None:
        """End sampling."""
        self._stop.set()
        self._thread.join()


def profile(run_dir: Path, replicates: int) -> list[dict[str, Any]]:
    """Run the steps of the stats stage and measure each.

    Parameters
    ----------
    run_dir : Path
        A complete run directory.
    replicates : int
        ``uncertainty.replicates``.

    Returns
    -------
    list of dict
        One entry per step: ``step``, ``seconds``, ``rss_after_mib``, ``peak_mib``.
    """
    tree = read_manifest(run_dir)["config"]
    tree.setdefault("uncertainty", {})["replicates"] = replicates
    config = validate_config(tree, "of the profiled run")
    reference, candidate = config.reference_model, config.candidates[0]
    entropy, weights, uncertainty = config.entropy, config.weights, config.uncertainty
    sampler = PeakSampler()
    steps: list[dict[str, Any]] = []
    state: dict[str, Any] = {}

    def step(name: str, action: Callable[[], Any]) -> Any:
        sampler.reset()
        started = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - started
        after = sampler.process.memory_info().rss
        steps.append(
            {
                "step": name,
                "seconds": round(seconds, 2),
                "rss_after_mib": round(after / MIB),
                "peak_mib": round(max(sampler.peak, after) / MIB),
            }
        )
        print(json.dumps(steps[-1]), file=sys.stderr, flush=True)
        return result

    sampling, num_samples = config.sampling_models, config.sampling.num_samples
    state["paired"] = step(
        "paired_frame (scan, side by side, streaming collect)",
        lambda: complete_paired(
            paired_frame(run_dir, reference, candidate, entropy.include_eos, sampling, num_samples)
        ),
    )
    stabilised = step(
        "stabilise_log_weights (k-hat in every mode)",
        lambda: stabilise_log_weights(
            state["paired"]["log_w1"].to_numpy(), weights.mode, weights.clip_threshold
        ),
    )
    state["seqs"] = step(
        "prepare (checks, prompt codes, weights)",
        lambda: prepare(state["paired"].with_columns(log_w=pl.Series(stabilised.log_w))),
    )
    state["paired"] = None
    state["sums"] = step("prompt_sums", lambda: prompt_sums(state["seqs"]))
    step("point_estimates", lambda: point_estimates(state["sums"], entropy.unit))
    step(
        "prompt_set_errors (influence functions)",
        lambda: prompt_set_errors(state["seqs"], state["sums"], entropy.unit),
    )
    step(
        f"cluster_bootstrap ({replicates} replicates; population estimand)",
        lambda: cluster_bootstrap(
            state["sums"],
            entropy.unit,
            uncertainty.replicates,
            uncertainty.seed,
            uncertainty.level,
        ),
    )
    step("weight_diagnostics", lambda: weight_diagnostics(state["seqs"]))
    step(
        "per_prompt_table (per-prompt estimates and SEs)",
        lambda: per_prompt_table(state["seqs"], state["sums"], entropy.unit, candidate),
    )
    state.clear()
    step(
        "generation_diagnostics (counts; decode vs prefill, side by side)",
        lambda: generation_diagnostics(run_dir, sampling, num_samples),
    )
    sampler.stop()
    return steps


def main(argv: list[str] | None = None) -> int:
    """Command line: one JSON line per step on stderr, a table on stdout; the exit status."""
    parser = argument_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--replicates", type=int, default=1000)
    args = parser.parse_args(argv)
    steps = profile(args.run_dir, args.replicates)
    print("| step | seconds | RSS after (MiB) | peak RSS during (MiB) |")
    print("|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['seconds']:.1f} | {s['rss_after_mib']:,} | {s['peak_mib']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
